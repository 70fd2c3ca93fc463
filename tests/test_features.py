"""Precomputed tower features (data/features.py, `vlm-dist precompute-features`): a run on feature shards
trains, validates and generates as the same run on the image shards does, and the wrong features are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, losses, make_demo_shards, metrics, set_one_rank_env, train_env
from vlm_dist.config import ConfigError, load_config
from vlm_dist.data.features import EXT, FeatureError, decode, precompute_features
from vlm_dist.train.loop import RunOptions, train

FROZEN = ["model.vision.freeze=true"]  # the tiny preset's tower trains; features need a frozen one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    shards = make_demo_shards(root, n_train=32, n_val=8)
    cfg = load_config("tiny", FROZEN)
    for split in ("train", "val"):
        precompute_features(str(shards / split), root / "feat" / split, cfg, batch_size=5, workers=0, progress=False)
    return shards, root / "feat"


@pytest.fixture()
def one_rank(monkeypatch):
    set_one_rank_env(monkeypatch)


def run(shards, run_dir, extra=()):
    cfg = load_config("tiny", [f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
                               "train.max_steps=6", "train.save_every=100", "train.eval_every=3", "log.tensorboard=false",
                               *FROZEN, *extra])
    opts = RunOptions(ds="ds_configs/zero2.json", run_dir=str(run_dir),
                      ds_overrides=["bf16.enabled=false", "optimizer.params.lr=0.002", "train_micro_batch_size_per_gpu=4",
                                    "scheduler.params.warmup_num_steps=2"])
    return train(cfg, opts)


def test_features_are_the_towers_output_for_each_image(data):
    """Each stored (P, W) token block equals the model's tower applied to that sample's JPEG (fp32)."""
    import webdataset as wds

    from vlm_dist.data.samples import ImageToTensor, wanted_member
    from vlm_dist.model import VLM

    shards, feat = data
    cfg = load_config("tiny", FROZEN)
    torch.manual_seed(cfg.train.seed)
    model = VLM(cfg.model).eval()  # the trainer's model: the same seed, so the same random tower
    to_tensor = ImageToTensor(cfg.model.vision.geometry["image_size"])
    images = {r["__key__"]: r["jpg"] for r in wds.tarfile_samples([{"url": str(shards / "val" / "val-00000.tar")}],
                                                                  select_files=wanted_member)}
    stored = {r["__key__"]: r[EXT] for r in wds.tarfile_samples([{"url": str(feat / "val" / "val-00000.tar")}],
                                                                 select_files=wanted_member)}
    assert sorted(stored) == sorted(images) and len(stored) == 8
    with torch.no_grad():
        for key, jpg in images.items():
            want = model.vision(to_tensor(jpg)[None])[0]
            got = decode(stored[key], key, "test", tuple(want.shape))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert want.abs().max() > 0.1  # a real output, not zeros


def test_training_on_feature_shards_equals_training_on_the_image_shards(data, one_rank, tmp_path):
    """The same run (6 steps, validation at 3 and 6) on image shards and on their feature shards: the same
    losses, validation losses and token accuracies (fp32)."""
    from vlm_dist.data.loader import build_loader

    shards, feat = data
    cfg = load_config("tiny", FROZEN)
    batch = next(iter(build_loader(cfg, str(feat / "train"), rank=0, world_size=1, micro_batch=4, train=True)))
    assert batch["images"].shape == (4, 16, 32) and batch["images"].dtype == torch.float32  # tokens, not pixels
    run(shards, tmp_path / "images")
    run(feat, tmp_path / "features")
    a, b = losses(tmp_path / "images"), losses(tmp_path / "features")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert b[6] < b[1]  # it learns
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    va, vb = metrics(tmp_path / "images", "val"), metrics(tmp_path / "features", "val")
    assert [m["step"] for m in va] == [m["step"] for m in vb] == [3, 6]
    for x, y in zip(va, vb):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x, y)
        assert x["token_acc_head0"] == y["token_acc_head0"]


def test_generation_on_feature_shards_equals_the_image_shards(data):
    """Decoding from a sample's features is decoding from its JPEG: the first step's logits (which differ from
    image to image) agree, and the generation eval's predictions are the same."""
    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.evaluate import evaluate_generation, iter_shard_samples
    from vlm_dist.model import VLM
    from vlm_dist.text import get_tokenizer, prompt_tokens

    shards, feat = data
    cfg = load_config("tiny", FROZEN)
    torch.manual_seed(cfg.train.seed)
    model = VLM(cfg.model).eval()
    to_tensor = ImageToTensor(cfg.model.vision.geometry["image_size"])
    jpgs = [(k, to_tensor(x)) for k, x, _ in iter_shard_samples(str(shards / "val"))]
    tokens = [(k, x) for k, x, _ in iter_shard_samples(str(feat / "val"))]
    assert [k for k, _ in jpgs] == [k for k, _ in tokens] and all(x.dim() == 2 for _, x in tokens)
    prompt = torch.tensor([prompt_tokens(get_tokenizer())] * len(jpgs))
    with torch.no_grad():
        a = model.step(prompt, model.new_cache(len(jpgs)), images=torch.stack([x for _, x in jpgs]))[:, 0, -1]
        b = model.step(prompt, model.new_cache(len(jpgs)), images=torch.stack([x for _, x in tokens]))[:, 0, -1]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (a[1:] - a[0]).abs().max() > 1e-3  # the images make a difference: the check can fail
    kw = dict(limit=8, max_new_tokens=6, batch_size=4, progress=False, meteor=False, java=False)
    p = evaluate_generation(model, str(shards / "val"), **kw)["predictions"]
    q = evaluate_generation(model, str(feat / "val"), **kw)["predictions"]
    assert len(p) == len(q) >= 8 and p == q
    with pytest.raises(FeatureError, match="freeze=false"):  # a model whose tower trains is refused them
        evaluate_generation(VLM(load_config("tiny", []).model), str(feat / "val"), **kw)


def test_the_trainer_refuses_features_it_cannot_use(data, one_rank, tmp_path):
    """Features of other tower weights (another seed's random tower), or for a tower that would train."""
    _, feat = data
    with pytest.raises(ConfigError, match="other weights"):
        run(feat, tmp_path / "seed", extra=["train.seed=1"])
    with pytest.raises(ConfigError, match="freeze"):
        run(feat, tmp_path / "trains", extra=["model.vision.freeze=false"])


def test_a_model_takes_features_only_for_a_frozen_tower_and_of_its_shape():
    from vlm_dist.model import VLM

    cfg = load_config("tiny", [])  # the tower trains
    model = VLM(cfg.model)
    P, W = cfg.model.n_image_tokens, model.vision.width
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="frozen tower"):
        model.embed(torch.zeros(2, P, W), ids)
    frozen = VLM(load_config("tiny", FROZEN).model)
    assert frozen.embed(torch.zeros(2, P, W), ids).shape == (2, P + 3, cfg.model.d_model)
    with pytest.raises(ValueError, match=f"\\(B, {P}, {W}\\)"):
        frozen.embed(torch.zeros(2, P + 1, W), ids)


def test_a_damaged_feature_member_names_the_sample_and_the_fix():
    with pytest.raises(FeatureError, match="sample 'k7'.*damaged.*precompute-features"):
        decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "k7", "x.tar")
    from vlm_dist.data.features import encode

    with pytest.raises(FeatureError, match="shape \\(3, 4\\), expected \\(16, 32\\)"):
        decode(encode(torch.zeros(3, 4)), "k8", "x.tar", (16, 32))


def test_precompute_refuses_a_tower_that_trains_feature_shards_as_input_and_a_missing_gpu(data, tmp_path):
    shards, feat = data
    cli = [sys.executable, "-m", "vlm_dist.cli", "precompute-features", "--config", "tiny", "--no-progress",
           "--workers", "0", "--out", str(tmp_path / "out")]
    trains = subprocess.run(cli + ["--shards", str(shards / "val")], capture_output=True, text=True, env=train_env(),
                            cwd=REPO, timeout=300)
    assert trains.returncode == 2 and "freeze=false" in trains.stderr, trains.stderr
    again = subprocess.run(cli + ["--shards", str(feat / "val"), "--set", "model.vision.freeze=true"], capture_output=True,
                           text=True, env=train_env(), cwd=REPO, timeout=300)
    assert again.returncode == 2 and "holds feature shards already" in again.stderr, again.stderr
    gpu = subprocess.run(cli + ["--shards", str(shards / "val"), "--set", "model.vision.freeze=true", "--device", "cuda:7"],
                         capture_output=True, text=True, env=train_env(CUDA_VISIBLE_DEVICES=""), cwd=REPO, timeout=300)
    assert gpu.returncode == 2 and "--device cuda:7: torch sees 0 CUDA GPU(s)" in gpu.stderr, gpu.stderr  # vlm_dist.devices
    manifest = json.loads((feat / "val" / "manifest.json").read_text())
    assert manifest["features"]["tokens"] == 16 and manifest["features"]["dtype"] == "fp32"


def _image_shard(folder, samples: dict) -> None:
    """A manifest-less image tar (scanned by the loader, as img2dataset's): key -> jpg bytes, a caption each."""
    from vlm_dist.data.tario import TarWriter

    folder.mkdir(parents=True)
    with TarWriter(folder / "s-00000.tar") as tar:
        for key in sorted(samples, key=lambda k: k + "."):
            tar.add(f"{key}.jpg", samples[key])
            tar.add(f"{key}.json", json.dumps({"captions": [f"a caption of {key}"], "image_id": 1}).encode())


def test_precompute_counts_bad_images_orders_keys_and_refuses_what_it_would_lose(data, tmp_path):
    """Keys whose member names sort unlike the keys ('a' / 'a-1'), an image that does not decode (listed and
    counted), no image decodable at all (an error), and output folders that would lose image shards."""
    import webdataset as wds

    from vlm_dist.data.samples import wanted_member

    shards, feat = data
    cfg = load_config("tiny", FROZEN)
    good = next(iter(wds.tarfile_samples([{"url": str(shards / "val" / "val-00000.tar")}], select_files=wanted_member)))["jpg"]
    _image_shard(tmp_path / "src", {"a": good, "a-1": good, "b": b"not an image"})
    summary = precompute_features(str(tmp_path / "src"), tmp_path / "out", cfg, workers=0, progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == {"bad_image": 1}
    assert [b["key"] for b in summary["bad_images"]] == ["b"]
    _image_shard(tmp_path / "bad", {"c": b"\xff\xd8 cut short"})
    with pytest.raises(FeatureError, match="no sample written.*bad_image"):
        precompute_features(str(tmp_path / "bad"), tmp_path / "out2", cfg, workers=0, progress=False)
    with pytest.raises(FeatureError, match="holds the source shards"):
        precompute_features(str(shards / "val"), shards / "val", cfg, workers=0, progress=False)
    with pytest.raises(FeatureError, match="holds image shards"):
        precompute_features(str(tmp_path / "src"), shards / "train", cfg, workers=0, progress=False)
    assert json.loads((shards / "train" / "manifest.json").read_text()).get("features") is None  # untouched


def test_feature_tars_without_their_manifest_are_refused_not_trained_unchecked(data, tmp_path):
    """Feature tars copied without manifest.json carry no record of their tower: the loader and the
    evaluation refuse them, naming the fix, instead of feeding unchecked tokens to the model."""
    import shutil

    from vlm_dist.data.loader import build_loader
    from vlm_dist.infer.evaluate import EvalDataError, iter_shard_samples

    _, feat = data
    shutil.copytree(feat / "val", tmp_path / "copy", ignore=shutil.ignore_patterns("manifest.json"))
    loader = build_loader(load_config("tiny", FROZEN), str(tmp_path / "copy"), rank=0, world_size=1, micro_batch=4,
                          train=False)
    with pytest.raises(ValueError, match="no features record.*manifest included"):
        next(iter(loader))
    with pytest.raises(EvalDataError, match="has no .jpg"):
        next(iter_shard_samples(str(tmp_path / "copy")))


def test_features_of_another_activation_or_size_are_refused():
    from vlm_dist.data.features import check_features

    vision = load_config("tiny", FROZEN).model.vision
    record = {"model_name": vision.model_name, "image_size": vision.geometry["image_size"], "quick_gelu": False,
              "fingerprint": "f"}
    check_features(record, vision, "f")  # fits
    for key, value in (("quick_gelu", True), ("image_size", 64), ("model_name", "ViT-B-32")):
        with pytest.raises(FeatureError, match="made by tower"):
            check_features({**record, key: value}, vision)
    with pytest.raises(FeatureError, match="other weights"):
        check_features(record, vision, "g")


def test_a_rerun_keeps_finished_feature_shards_and_redoes_changed_ones(data, tmp_path):
    """precompute-features into a folder it wrote before: shards made from the same source files by the same
    tower are kept (not recomputed); one whose source changed, or whose bytes were damaged, is written again."""
    import os
    import shutil

    shards, _ = data
    cfg = load_config("tiny", FROZEN)
    shutil.copytree(shards / "train", tmp_path / "src")
    first = precompute_features(str(tmp_path / "src"), tmp_path / "out", cfg, workers=0, progress=False)
    tars = sorted((tmp_path / "out").glob("*.tar"))
    before = {t.name: t.read_bytes() for t in tars}
    again = precompute_features(str(tmp_path / "src"), tmp_path / "out", cfg, workers=0, progress=False)
    assert first["kept"] == 0 and again["kept"] == len(tars) == 2 and again["samples"] == first["samples"] == 32
    src0 = tmp_path / "src" / tars[0].name
    os.utime(src0, ns=(src0.stat().st_atime_ns, src0.stat().st_mtime_ns + 10**9))  # the source changed (its time)
    with open(tars[1], "r+b") as f:  # a damaged output shard
        f.seek(700)
        f.write(b"\x00\x01")
    third = precompute_features(str(tmp_path / "src"), tmp_path / "out", cfg, workers=0, progress=False)
    assert third["kept"] == 0 and third["samples"] == 32
    assert {t.name: t.read_bytes() for t in tars} == before  # rewritten, to the same bytes
    other = precompute_features(str(tmp_path / "src"), tmp_path / "out", load_config("tiny", [*FROZEN, "train.seed=1"]),
                                workers=0, progress=False)
    assert other["kept"] == 0  # another tower's weights: nothing kept


def test_the_decoding_processes_import_no_torch():
    """precompute-features' spawned decoders import only the module of their job (pixels_job): PIL, not torch,
    which took ~1 s per process to import (docs/bench/gpu_round9.md)."""
    import subprocess
    import sys

    from vlm_dist.data.images import pixels_job

    code = (f"import sys; import {pixels_job.__module__}; "
            "print(sorted(m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
