"""Rank-0 observability: FLOP count, gradient statistics (in-process and under 2-rank ZeRO-2/3 vs one
rank), token-comparison rendering, and what the TensorBoard event files hold. The multi-process runs
are shared by the slow tests through one module fixture (4 runs, ~1.5 min on 2 idle cores)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_demo_shards, metrics, run_ranks
from vlm_dist.config import load_config
from vlm_dist.model import VLM
from vlm_dist.observe.flops import train_flops
from vlm_dist.observe.gradstats import GradObserver, layer_groups
from vlm_dist.observe.logger import NullLogger, make_logger
from vlm_dist.observe.tokens import (GREEN, GREY, HEAD_COLOURS, RED, WHITE, cell_box, comparison_columns,
                                     render_comparison, render_position_accuracy, unnormalise)
from vlm_dist.text import IGNORE_INDEX

X = IGNORE_INDEX


# --- in-process ---------------------------------------------------------------------------------

def tiny_batch(cfg, B=3, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 1000, (B, cfg.n_future, T), generator=g)
    targets[:, :, 15:] = X
    targets[0, 1, :4] = X
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 1000, (B, T), generator=g), targets


@pytest.mark.parametrize("freeze", [False, True])
def test_flops_match_flop_counter(freeze):
    """The analytic count equals torch's FlopCounterMode on a real forward+backward, except for the
    vision tower's attention scores, which the counter misses (nn.MultiheadAttention's fused CPU kernel):
    exactly 4·N²·W per layer and image, times 3 when trained (fwd + bwd) or 1 when frozen. The head
    loss accumulates its weight gradient in place (aten::addmm_), for which the counter has no formula:
    it is given addmm's. (The head loss keeps this small batch's logits, so nothing is recomputed.)"""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # as torch's addmm
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    cfg = load_config("tiny", ["model.activation_checkpointing=false", "model.attention=explicit",
                               f"model.vision.freeze={str(freeze).lower()}"]).model
    model = VLM(cfg)
    images, ids, targets = tiny_batch(cfg)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
        model(images, ids, targets)["loss"].backward()
    n_targets = int((targets != X).sum())
    analytic = train_flops(cfg, model.vocab_size, images.shape[0], ids.shape[1], n_targets)
    N, W = cfg.n_image_tokens + 1, cfg.vision.geometry["width"]
    missed = (1 if freeze else 3) * images.shape[0] * 1 * 4 * N * N * W  # vlm-tiny-vit has one layer
    assert analytic - counter.get_total_flops() == missed


def test_peak_flops_picks_the_card_whose_name_matches_most_specifically(monkeypatch):
    """Names as torch.cuda.get_device_name gives them: one that contains another card's name (H100 NVL holds
    H100, L40 holds L4) gets its own peak, not the first substring's."""
    from vlm_dist.observe.flops import peak_flops

    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12,
                "NVIDIA H200": 989e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12,
                "NVIDIA L4": 121e12, "NVIDIA A100-SXM4-80GB": 312e12, "Tesla V100-SXM2-16GB": None}
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == peak, name
    assert peak_flops(torch.device("cpu")) is None


def test_grad_stats_in_process():
    """Layers partition the trainable parameters; per-layer norms / max / NaN counts are those of the
    gradients; the global norm is torch's total norm; the update ratio of an SGD step is lr·|g|/|w|."""
    cfg = load_config("tiny", ["model.vision.freeze=true"]).model
    torch.manual_seed(0)
    model = VLM(cfg)
    groups = layer_groups(model)
    assert "vision" not in groups and {"projector", "embeddings", "block0", "block1", "norm", "head1"} == set(groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for ps in groups.values() for p in ps)

    model(*tiny_batch(cfg))["loss"].backward()
    model.blocks[1].mlp[0].weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    recorded = []

    class Log(NullLogger):
        def scalars(self, step, values, split="train"):
            recorded.append(dict(values))

    lr = 0.1
    obs = GradObserver(model, 1, 0, gather_grad=lambda p: p.grad, gather_param=lambda p: None)
    obs.before_step(1, Log())
    with torch.no_grad():
        grads = {k: [p.grad.clone() for p in ps] for k, ps in groups.items()}
        weights = {k: [p.clone() for p in ps] for k, ps in groups.items()}
        for p in trainable:
            p -= lr * torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    obs.after_step(Log())
    stats, ratios = recorded
    assert stats["nonfinite/block1"] == 3 and math.isnan(stats["norm/block1"])
    assert math.isnan(stats["global_norm"])
    finite_b1 = torch.cat([g.flatten() for g in grads["block1"]])
    assert stats["max_abs/block1"] == pytest.approx(float(finite_b1[finite_b1.isfinite()].abs().max()), rel=1e-6)
    finite = [k for k in groups if k != "block1"]
    for k in finite:
        assert stats[f"nonfinite/{k}"] == 0
        assert stats[f"norm/{k}"] == pytest.approx(float(torch.cat([g.flatten() for g in grads[k]]).double().norm()), rel=1e-9)
        assert stats[f"max_abs/{k}"] == pytest.approx(max(float(g.abs().max()) for g in grads[k]), rel=1e-6)
        w = float(torch.cat([p.flatten() for p in weights[k]]).double().norm())
        assert ratios[f"update_ratio/{k}"] == pytest.approx(lr * stats[f"norm/{k}"] / w, rel=1e-5)
    for p in trainable:
        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    recorded.clear()
    obs.before_step(2, Log())
    total = torch.nn.utils.get_total_norm([p.grad.double() for p in trainable])  # float32 norms drift ~1e-5 here
    assert recorded[0]["global_norm"] == pytest.approx(float(total), rel=1e-9)
    assert recorded[0]["global_norm"] == pytest.approx(
        math.sqrt(sum(v**2 for k, v in recorded[0].items() if k.startswith("norm/"))), rel=1e-12)


def test_comparison_image_colours():
    """Green where the prediction equals the target, red where not, grey where that head has no
    target; positions where no head has a target are left out."""
    targets = torch.tensor([[X, 5, 6, 7, X, X],  # head 0: targets at positions 1..3
                            [X, 6, 7, X, X, X]])  # head 1: positions 1..2
    pred = torch.tensor([[9, 5, 1, 7, 3, 3],
                         [9, 2, 7, 4, 3, 3]])
    assert comparison_columns(targets) == [1, 2, 3]
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :, 2] = 255  # a blue thumbnail
    out = render_comparison(targets, pred, image)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3

    def colour(head, row, col):
        x0, y0, _, _ = cell_box(head, row, col)
        return tuple(out[y0 + 1, x0 + 1])  # just inside the cell's corner: fill, not text

    assert [colour(0, 1, c) for c in range(3)] == [GREEN, RED, GREEN]
    assert [colour(1, 1, c) for c in range(3)] == [RED, GREEN, GREY]
    assert colour(0, 0, 0) not in (GREEN, RED, GREY, WHITE)  # ground-truth cells are neutral
    assert out.shape[1] == cell_box(0, 0, 2)[2] + 1 + 4  # three columns, then the right margin
    assert tuple(out[10, 10]) == (0, 0, 255)  # the thumbnail
    assert (out[cell_box(0, 0, 0)[1]:cell_box(0, 0, 0)[3], cell_box(0, 0, 0)[0]:cell_box(0, 0, 0)[2]] < 60).any()  # text


def test_position_accuracy_plot():
    correct = torch.tensor([[4.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[4.0, 4.0, 4.0], [4.0, 4.0, 0.0]])
    out = render_position_accuracy(correct, valid)
    top, bottom = out[: out.shape[0] // 2], out[out.shape[0] // 2:]
    has = lambda region, c: bool((region == np.array(c, np.uint8)).all(-1).any())  # noqa: E731
    assert has(top, HEAD_COLOURS[0]) and has(bottom, HEAD_COLOURS[1])


def test_unnormalise_inverts_open_clip_transform():
    import open_clip

    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    tensor = open_clip.image_transform(32, is_train=False)(Image.fromarray(image))
    assert np.abs(unnormalise(tensor).astype(int) - image).max() <= 1


def test_null_logger_constructs_no_writer(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb

    def refuse(*a, **k):
        raise AssertionError("a SummaryWriter was constructed")

    monkeypatch.setattr(tb, "SummaryWriter", refuse)
    log = make_logger(1, tmp_path / "run", tensorboard=True, total_steps=10)
    log.scalars(1, {"loss": 1.0})
    log.image(1, "x", lambda: (_ for _ in ()).throw(AssertionError("rendered off rank 0")))
    log.close()
    assert not (tmp_path / "run").exists()


# --- multi-process: 1 rank vs 2 ranks under ZeRO-2 and ZeRO-3 ------------------------------------------

STEPS = 4
SPY = """import os
if os.environ.get("OBSERVE_SPY_LOG"):
    import torch.utils.tensorboard as _tb
    _init = _tb.SummaryWriter.__init__
    def _spy(self, *a, **k):
        with open(os.environ["OBSERVE_SPY_LOG"], "a") as f:
            f.write(os.environ.get("RANK", "?") + "\\n")
        _init(self, *a, **k)
    _tb.SummaryWriter.__init__ = _spy
"""


@pytest.fixture(scope="module")
def runs(module_dir):
    root = module_dir("observe")
    shards = make_demo_shards(root / "data", n_train=64, n_val=16)
    spy = root / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)  # records every SummaryWriter construction with its RANK
    common = ["--config", "tiny", "--train-shards", str(shards / "train"), "--val-shards", str(shards / "val"),
              "--max-steps", str(STEPS), "--eval-every", "2", "--save-every", "100", "--set", "data.shuffle_buffer=8",
              "--set", "log.grad_stats_every=1", "--set", "log.histograms_every=2", "--set", "log.token_images=2",
              "--ds-set", "bf16.enabled=false", "--ds-set", "optimizer.params.lr=0.001",
              "--ds-set", "scheduler.params.warmup_num_steps=2", "--ds-set", "train_micro_batch_size_per_gpu=4"]
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(spy), os.environ.get("PYTHONPATH", "")]))
        for name, world, extra in [
            # Same global batch of 8 (see test_train_dist.py): 1 rank x 2 streams x accumulation 2, or 2 ranks.
            ("one_rank", 1, ["--ds", "ds_configs/zero2.json", "--set", "data.num_workers=2",
                             "--ds-set", "gradient_accumulation_steps=2"]),
            ("zero1", 2, ["--ds", "ds_configs/zero1.json"]),
            ("zero2", 2, ["--ds", "ds_configs/zero2.json"]),
            ("zero3", 2, ["--ds", "ds_configs/zero3.json"]),
        ]:
            mp.setenv("OBSERVE_SPY_LOG", str(root / f"{name}.writers"))
            run_ranks([*common, "--run-dir", str(root / name), *extra], world)
            out[name] = root / name
    return out


def grad_records(run_dir):
    merged: dict[int, dict] = {}
    for r in metrics(run_dir, "grad"):
        merged.setdefault(r["step"], {}).update(r)
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_layer_grad_stats_two_ranks_equal_one_rank(runs, stage):
    one, two = grad_records(runs["one_rank"]), grad_records(runs[f"zero{stage}"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    layers = [k.split("/", 1)[1] for k in one[1] if k.startswith("norm/")]
    assert {"vision", "projector", "embeddings", "block0", "block1", "norm", "head1"} == set(layers)
    for step in one:
        for layer in layers:
            for stat in ("norm", "max_abs"):
                a, b = one[step][f"{stat}/{layer}"], two[step][f"{stat}/{layer}"]
                assert abs(a - b) <= 1e-5, (stage, step, stat, layer, a, b)
            assert one[step][f"nonfinite/{layer}"] == two[step][f"nonfinite/{layer}"] == 0
            assert one[step][f"norm/{layer}"] > 0  # a gather that returned nothing would agree on zeros
            a, b = one[step][f"update_ratio/{layer}"], two[step][f"update_ratio/{layer}"]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, step, "update_ratio", layer, a, b)
    lr = {r["step"]: r["lr"] for r in metrics(runs["one_rank"])}
    assert {s for s in one if one[s]["update_ratio/block0"] > 0} == {s for s in lr if lr[s] > 0} != set()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one_rank", "zero1", "zero2", "zero3"])
def test_global_norm_is_root_sum_of_layer_norms(runs, name):
    grads = grad_records(runs[name])
    for r in metrics(runs[name]):
        layer_sq = sum(v**2 for k, v in grads[r["step"]].items() if k.startswith("norm/"))
        assert math.sqrt(layer_sq) == pytest.approx(grads[r["step"]]["global_norm"], rel=1e-9)
        assert r["grad_norm"] == pytest.approx(math.sqrt(layer_sq), rel=1e-5)  # the engine's, pre-clip


@pytest.mark.slow
def test_event_files_hold_scalars_histograms_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["zero2"] / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["loss", "loss_head0", "loss_head1", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait",
                "time_forward", "time_backward", "time_optimizer", "time_observe", "tflops_per_device",
                "mem_rss_gib"]:
        assert f"train/{tag}" in tags["scalars"], tag
        assert [e.step for e in acc.Scalars(f"train/{tag}")] == list(range(1, STEPS + 1))
    assert "train/mfu" not in tags["scalars"]  # no known peak on the CPU
    assert {"val/loss", "val/token_acc_head0", "val/token_acc_head1"} <= set(tags["scalars"])
    for layer in ["vision", "projector", "embeddings", "block0", "block1", "norm", "head1"]:
        for stat in ["norm", "max_abs", "nonfinite", "update_ratio"]:
            assert [e.step for e in acc.Scalars(f"grad/{stat}/{layer}")] == [1, 2, 3, 4]
        for kind in ["grad", "weight"]:
            assert [e.step for e in acc.Histograms(f"hist_{kind}/{layer}")] == [2, 4]
    assert all(e.value > 0 for e in acc.Scalars("train/tflops_per_device"))
    assert sorted(tags["images"]) == ["tokens/sample0", "tokens/sample1", "val/position_accuracy"]
    for tag in tags["images"]:
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4]
        image = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert (image.shape[0], image.shape[1]) == (events[-1].height, events[-1].width)
        if tag.startswith("tokens/"):  # every prediction cell is green, red or grey
            cells = [tuple(image[y0 + 1, x0 + 1]) for x0, y0, _, _ in (cell_box(k, 1, 0) for k in range(2))]
            assert all(c in (GREEN, RED, GREY) for c in cells), cells


@pytest.mark.slow
def test_only_rank_zero_writes_events(runs):
    for name in ("zero1", "zero2", "zero3"):
        files = sorted(runs[name].rglob("*tfevents*"))
        assert len(files) == 1 and files[0].parent == runs[name] / "tb", files
        assert (runs[name].parent / f"{name}.writers").read_text().split() == ["0"]  # rank 1 never built one
