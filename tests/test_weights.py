"""Pretrained vision weights: fetched once per node, one clear message when they cannot be had, and
no frozen random tower unless asked for.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_weights.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, make_demo_shards, train_env
from vlm_dist.config import ConfigError, load_config
from vlm_dist.model.vision import PretrainedWeightsError
from vlm_dist.train.weights import fetch_once

HUB_REPO = "timm/vit_base_patch32_clip_224.openai"


def _no_collective(flag: bool) -> bool:
    return flag  # a world of one


# ---- config: a frozen random tower is refused unless explicitly allowed --------------------------

def test_frozen_tower_without_weights_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"model.vision.freeze=true with model.vision.pretrained=null .*"
                                          r"model.vision.allow_random_frozen=true"):
        load_config("base", ["model.vision.pretrained=null"])
    with pytest.raises(ConfigError, match="model.vision.allow_random_frozen=true"):
        load_config(None)  # no preset: the defaults alone used to be a frozen random tower
    cfg = load_config("base", ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"])
    assert cfg.model.vision.freeze and cfg.model.vision.pretrained is None
    assert not load_config("tiny").model.vision.freeze  # the presets without weights train their tower


def test_pretrained_tag_typo_lists_the_tags():
    with pytest.raises(ConfigError, match=r"pretrained='opnai' is neither an open_clip pretrained tag of "
                                          r"'ViT-B-32' \(openai, .*/path/to/open_clip_checkpoint"):
        load_config("base", ["model.vision.pretrained=opnai"])


def test_quick_gelu_follows_the_openai_weights():
    """OpenAI's CLIP was trained with QuickGELU; open_clip's 'ViT-B-32' config uses GELU and only warns."""
    assert load_config("base").model.vision.quick_gelu is True
    assert load_config("base", ["model.vision.pretrained=/x/ckpt.pt"]).model.vision.quick_gelu is True  # preset
    assert load_config("base", ["model.vision.pretrained=laion2b_s34b_b79k", "model.vision.quick_gelu=null"]
                       ).model.vision.quick_gelu is False
    assert load_config("tiny").model.vision.quick_gelu is False
    named = ["model.vision.model_name=ViT-B-32-quickgelu", "model.vision.pretrained=null", "model.vision.freeze=false"]
    assert load_config("base", named).model.vision.quick_gelu is True
    with pytest.raises(ConfigError, match="always uses QuickGELU"):
        load_config("base", [*named, "model.vision.quick_gelu=false"])


# ---- the real open_clip / huggingface_hub path, offline --------------------------------------------

def _fill_hub_cache(hf_home: Path, filename: str, data: bytes) -> Path:
    """The huggingface_hub cache layout for one file of HUB_REPO (what a download leaves behind)."""
    repo = hf_home / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def test_cached_weights_resolve_offline_through_open_clip(tmp_path):
    hf_home = tmp_path / "hf"
    expected = _fill_hub_cache(hf_home, "open_clip_pytorch_model.bin", b"not really weights")
    code = (
        "import json\n"
        "from vlm_dist.config import load_config\n"
        "from vlm_dist.train.weights import OpenClipHub, fetch_once\n"
        "cfg = load_config('base').model\n"
        "out = fetch_once(cfg, local_rank=0, any_failed=lambda f: f)\n"
        "print(json.dumps([out.vision.pretrained, OpenClipHub().cached(cfg.vision), out.vision.quick_gelu]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=train_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    resolved, cached, quick_gelu = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(resolved).resolve() == expected.resolve() == Path(cached).resolve()
    assert quick_gelu is True  # kept when the tag becomes a file path


def test_local_checkpoint_and_random_init_pass_through(tmp_path):
    class NoHub:
        def download(self, cfg):
            raise AssertionError("a local file or pretrained=null must not touch the hub")

        cached = download

    tiny = load_config("tiny").model
    assert fetch_once(tiny, local_rank=0, hub=NoHub(), any_failed=_no_collective) is tiny
    ckpt = tmp_path / "open_clip.pt"
    ckpt.write_bytes(b"x")
    with_file = load_config("base", [f"model.vision.pretrained={ckpt}"]).model
    assert fetch_once(with_file, local_rank=0, hub=NoHub(), any_failed=_no_collective) is with_file
    missing = load_config("base", [f"model.vision.pretrained={tmp_path / 'nope.pt'}"]).model
    with pytest.raises(PretrainedWeightsError, match="no such checkpoint file"):
        fetch_once(missing, local_rank=0, hub=NoHub(), any_failed=_no_collective)


def _unreachable_message_check(tmp_path: Path, world: int) -> str:
    """`python -m vlm_dist.train --config base` on `world` ranks, offline with an empty HF cache."""
    shards = make_demo_shards(tmp_path / "data", n_train=8, n_val=0, shard_size=8)
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "vlm_dist.train", "--config", "base", "--train-shards", str(shards / "train"),
         "--run-dir", str(tmp_path / "run"), "--ds-set", "bf16.enabled=false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=train_env(HF_HOME=str(tmp_path / "empty_hf"), HF_HUB_OFFLINE="1", RANK=str(r), LOCAL_RANK=str(r),
                      WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2] * world, outs
    stderr = "".join(err for _, err in outs)
    assert stderr.count("cannot load the pretrained vision weights") == 1, stderr  # once, not once per rank
    assert "Traceback" not in stderr, stderr
    cache = tmp_path / "empty_hf" / "hub"
    for needle in ["model 'ViT-B-32' with pretrained='openai'", HUB_REPO, f"not in the hub cache {cache}",
                   "HF_HUB_OFFLINE=1 is set", "--set model.vision.pretrained=/path/to/open_clip_checkpoint"]:
        assert needle in stderr, (needle, stderr)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was written
    return stderr[stderr.index("error: cannot load"):]


def test_hub_unreachable_one_message_exit_2(tmp_path):
    print(_unreachable_message_check(tmp_path, world=1))


@pytest.mark.slow
def test_hub_unreachable_two_ranks_message_printed_once(tmp_path):
    _unreachable_message_check(tmp_path, world=2)


# ---- fetch once per node: two real ranks, a stand-in hub that counts calls ----------------------------

@pytest.mark.slow
def test_fetch_once_per_node_on_two_ranks(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "tests/scripts/fetch_once_check.py", str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=train_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = {}
    for out in outs:
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        res[r["rank"]] = r

    def calls(name):
        return [json.loads(l) for l in (tmp_path / name / "calls.jsonl").read_text().splitlines()]

    # One node (local ranks 0, 1): one download, by local rank 0; rank 1 read the cache after it ended.
    one = calls("one_node")
    assert [(c["rank"], c["call"]) for c in one if c["call"] == "download"] == [(0, "download")]
    done = next(c["t"] for c in one if c["call"] == "downloaded")
    hit = [c for c in one if c["rank"] == 1]
    assert [c["call"] for c in hit] == ["cached-hit"] and hit[0]["t"] >= done
    assert res[0]["one_node"] == res[1]["one_node"] and res[1]["one_node"]["read"] == "weights"
    # Two nodes (each rank is local rank 0 of its own node, own cache): one download per node.
    two = calls("two_nodes")
    assert sorted(c["rank"] for c in two if c["call"] == "download") == [0, 1]
    assert all(c["call"] in ("download", "downloaded") for c in two)
    assert res[0]["two_nodes"]["pretrained"] != res[1]["two_nodes"]["pretrained"]
    # A failing hub: rank 0 tried once; both ranks raise, only rank 0 reports (the message is printed once).
    fail = calls("failing")
    assert [(c["rank"], c["call"]) for c in fail] == [(0, "download")]
    assert res[0]["failing"] == {"error": "stand-in hub: unreachable", "report": True}
    assert res[1]["failing"]["report"] is False
