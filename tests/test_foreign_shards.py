"""Shards written in img2dataset's webdataset layout (no manifest.json): counted, loaded, trained on.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_foreign_shards.py
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import losses, run_ranks
from vlm_dist.cli import app
from vlm_dist.config import load_config
from vlm_dist.data.demo import make_demo_data
from vlm_dist.data.index import index_directory
from vlm_dist.data.loader import build_loader

N_IMAGES, PER_SHARD = 30, 12  # shards 00000 (12), 00001 (12), 00002 (6)
# Defects img2dataset can leave (an empty caption) or a hand-edited set can hold (a lost image):
# (shard, index in shard) -> what is wrong with the sample.
DEFECTS = {(0, 3): "no_jpg", (1, 0): "empty_txt", (1, 5): "no_txt", (2, 2): "empty_txt"}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_img2dataset_shards(root: Path) -> tuple[Path, dict[str, str]]:
    """img2dataset's output_format=webdataset layout: 0000S.tar with {key}.jpg/.txt/.json (key = shard id
    + index in shard, 9 digits), 0000S_stats.json per shard; no manifest.json. Returns the folder and the
    caption of every usable sample by key."""
    split = make_demo_data(root / "src", n_train=N_IMAGES, n_val=0, seed=3, side=32)["train"]
    anns = json.loads(split["captions"].read_text())
    caption = {a["image_id"]: a["caption"] for a in anns["annotations"]}
    images = sorted(anns["images"], key=lambda i: i["id"])
    out = root / "img2dataset"
    out.mkdir()
    usable: dict[str, str] = {}
    for shard in range(math.ceil(N_IMAGES / PER_SHARD)):
        rows = images[shard * PER_SHARD : (shard + 1) * PER_SHARD]
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i, img in enumerate(rows):
                key = f"{shard:05d}{i:04d}"
                jpg = (Path(split["images"]) / img["file_name"]).read_bytes()
                text = caption[img["id"]]
                defect = DEFECTS.get((shard, i))
                w, h = Image.open(io.BytesIO(jpg)).size
                meta = {"url": f"https://example.com/{img['file_name']}", "caption": text, "key": key,
                        "status": "success", "error_message": None, "width": w, "height": h,
                        "original_width": w, "original_height": h, "exif": "{}",
                        "sha256": hashlib.sha256(jpg).hexdigest()}
                if defect != "no_jpg":
                    _member(tar, f"{key}.jpg", jpg)
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                if defect != "no_txt":
                    _member(tar, f"{key}.txt", b"" if defect == "empty_txt" else text.encode())
                if defect is None:
                    usable[key] = text
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 1.0, "status_dict": {"success": len(rows)}}))
    return out, usable


@pytest.fixture(scope="module")
def foreign(module_dir):
    return make_img2dataset_shards(module_dir("foreign"))


def test_index_counts_usable_samples_and_reasons(foreign):
    directory, usable = foreign
    index = index_directory(directory)
    assert [s["samples"] for s in index["shards"]] == [11, 10, 5]
    assert index["totals"] == {"samples": len(usable), "skipped": 4,
                               "skipped_by_reason": {"missing_caption": 3, "missing_image": 1}}
    assert index["stats_mismatches"] == []  # usable + skipped = img2dataset's successes, per shard


def test_a_folder_without_manifest_is_scanned_once(foreign, monkeypatch):
    import vlm_dist.data.index as index
    from vlm_dist.data.manifest import resolve_shards

    calls = []
    real = index.index_directory
    monkeypatch.setattr(index, "index_directory", lambda *a, **k: calls.append(a) or real(*a, **k))
    shards = resolve_shards(str(foreign[0]))
    assert len(calls) == 1 and shards and all(s.samples > 0 for s in shards)


def test_eval_refuses_shards_without_metadata(foreign):
    from vlm_dist.infer.evaluate import EvalDataError, iter_shard_samples

    with pytest.raises(EvalDataError, match=r"has no \.(json|jpg): evaluation needs each image's image_id"):
        list(iter_shard_samples(str(foreign[0])))


def _all_samples(loader) -> list[tuple[str, list[str], bool]]:
    loader.set_epoch(0)
    return [(k, refs, pad) for b in loader for k, refs, pad in zip(b["keys"], b["references"], b["is_pad"].tolist())]


@pytest.mark.parametrize("world", [1, 2])
def test_loader_reads_the_shards_without_a_manifest(foreign, world):
    directory, usable = foreign
    assert not (directory / "manifest.json").exists()
    cfg = load_config("tiny", ["data.qa_fraction=0"])
    loaders = [build_loader(cfg, str(directory), rank=r, world_size=world, micro_batch=4, train=True, num_workers=0)
               for r in range(world)]
    seen = [s for ld in loaders for s in _all_samples(ld)]
    real = [(k, refs) for k, refs, pad in seen if not pad]
    assert sorted(k for k, _ in real) == sorted(usable)  # every usable sample once, the defective never
    assert all(refs == [usable[k]] for k, refs in real)  # the caption comes from .txt
    assert {len(_all_samples(ld)) for ld in loaders} == {loaders[0].samples_per_epoch}  # equal epochs
    text = loaders[0].describe()
    assert "4 sample(s) without an image or a caption skipped" in text and "3 shard(s) had no manifest.json" in text


def test_index_shards_command_writes_the_manifest_the_loader_uses(foreign, tmp_path):
    directory, usable = foreign
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in directory.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    r = CliRunner().invoke(app, ["index-shards", str(copy)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "usable samples   26  in 3 shard(s)" in r.stdout and "missing_image    1" in r.stdout
    manifest = json.loads((copy / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == len(usable)
    loader = build_loader(load_config("tiny"), str(copy / "{00000..00002}.tar"), rank=0, world_size=1,
                          micro_batch=2, train=False, num_workers=0)
    assert loader.stats["scanned"] == 0 and loader.stats["skipped"] == 4
    assert sorted(k for k, _, pad in _all_samples(loader) if not pad) == sorted(usable)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, ["index-shards", str(empty)])
    assert r.exit_code == 2 and "holds no .tar shards" in r.stderr


@pytest.mark.slow
def test_train_two_ranks_on_img2dataset_shards(foreign, tmp_path):
    directory, _ = foreign
    run_dir = tmp_path / "run"
    results = run_ranks(["--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(directory),
                         "--run-dir", str(run_dir), "--max-steps", "3", "--save-every", "100",
                         "--ds-set", "train_micro_batch_size_per_gpu=4", "--ds-set", "bf16.enabled=false"], world=2)
    assert "26 samples in 3 shard(s)" in results[0].stdout
    assert "4 sample(s) without an image or a caption skipped" in results[0].stdout
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())


def test_the_scan_refuses_what_the_loader_could_not_use(tmp_path):
    """The scan and the loader share one rule (sample_problem): a .json whose captions are not a list of strings
    (a loader would train on single characters) or whose Q&A pairs lack a question, and a .txt caption that is
    not UTF-8 (the loader would crash mid-epoch), are counted as skipped, with their reason; a tar holding a
    member twice (webdataset's grouping raises on it mid-epoch) is refused when scanned, naming the member."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "JPEG")
    jpg = buf.getvalue()
    samples = {"0000": {"json": json.dumps({"captions": "a red square"}).encode()},
               "0001": {"json": json.dumps({"captions": ["a red square", ""]}).encode()},
               "0002": {"json": json.dumps({"qa": [{"answer": "red"}]}).encode()},
               "0003": {"txt": "caf\xe9 au lait".encode("latin-1")},
               "0004": {"txt": "café au lait".encode()},
               "0005": {"json": json.dumps({"captions": ["a red square"], "qa": [{"question": "what?", "answer": "red"}]}).encode()}}
    good = tmp_path / "good"
    good.mkdir()
    with tarfile.open(good / "00000.tar", "w") as tar:
        for key, members in samples.items():
            _member(tar, f"{key}.jpg", jpg)
            for ext, data in members.items():
                _member(tar, f"{key}.{ext}", data)
    index = index_directory(good)
    assert index["totals"] == {"samples": 2, "skipped": 4, "skipped_by_reason": {"bad_caption": 1, "bad_json": 3}}
    cfg = load_config("tiny", ["data.shuffle_buffer=0", "data.qa_fraction=0"])
    batch = next(iter(build_loader(cfg, str(good), rank=0, world_size=1, micro_batch=2, train=False, num_workers=0)))
    assert sorted(batch["keys"]) == ["0004", "0005"] and ["café au lait"] in batch["references"]
    twice = tmp_path / "twice"
    twice.mkdir()
    with tarfile.open(twice / "00000.tar", "w") as tar:
        for name, data in [("0000.jpg", jpg), ("0000.txt", b"a red square"), ("0000.txt", b"again")]:
            _member(tar, name, data)
    with pytest.raises(ValueError, match=r"00000.tar holds 0000.txt twice"):
        index_directory(twice)
