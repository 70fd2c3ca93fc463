"""tools/bench_gpu.py: the --cpu-smoke run covers every part; the pieces behave (OOM stops the sweep,
the SDPA detector tells kernels apart, no GPU = a fast, clear exit).

    python -m pytest -q tests/test_bench_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out, md = tmp_path / "smoke.json", tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--cpu-smoke", "--json", str(out),
                           "--append", str(md), "--workdir", str(tmp_path / "work")],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for part in ("train", "profile", "compile", "bucket", "optimizer", "loader", "decode"):
        assert part in res and "error" not in res[part], (part, res.get(part))

    rows = res["train"]["rows"]  # the sweep: every micro-batch with checkpointing on AND off
    assert {(r["micro"], r["ckpt"]) for r in rows} == {(2, True), (2, False), (4, True), (4, False)}
    for r in rows:
        assert r["status"] == "ok" and r["step_s"] > 0 and r["back_to_back_s"] > 0 and r["step_flops"] > 0
        assert r["samples_s"] == pytest.approx(r["micro"] / r["step_s"])
        assert r["tflops"] == pytest.approx(r["step_flops"] / r["step_s"] / 1e12)
        assert r["mfu"] is None  # no peak on the CPU: MFU is left out, never invented
    assert res["train"]["sdpa"] == ["flash (CPU kernel)"]

    prof = res["profile"]  # where the best row's step goes: real ops, shares of one busy total
    assert prof["rows"] and prof["busy_ms_per_step"] > 0
    assert sum(r["share"] for r in prof["rows"]) <= 1 + 1e-9 and all(0 < r["share"] <= 1 for r in prof["rows"])
    assert any("mm" in r["name"] or "linear" in r["name"] for r in prof["rows"])
    assert prof["host"]["micro"] == 2 and prof["host"]["rows"] and prof["host"]["wall_ms_per_step"] > 0

    comp = res["compile"]  # model.compile off, then all, on the checkpointed model, at the best micro-batch
    # ... then the fastest of them again on precomputed tower tokens (the smoke freezes tiny's tower, as base's is)
    assert [(r["compiled"], r["ckpt"], r["status"], r["features"]) for r in comp["rows"][:2]] == [
        ("off", True, "ok", False), ("all", True, "ok", False)]
    fastest = min(comp["rows"][:2], key=lambda r: r["step_s"])
    feat = comp["rows"][2]
    assert len(comp["rows"]) == 3 and feat["features"] and feat["status"] == "ok"
    assert feat["compiled"] == fastest["compiled"] and feat["step_flops"] < fastest["step_flops"]  # no tower FLOPs
    assert all(r["micro"] == comp["micro"] for r in comp["rows"])
    # the compiled row's first step compiled (inductor: seconds), the eager one's did not
    assert comp["rows"][1]["first_step_s"] > 1.0 > comp["rows"][0]["first_step_s"]
    prof = comp["profile"]  # a profile of the fastest row if it compiled; never of eager
    assert prof is None or (prof["compiled"] == "all" and prof["rows"])

    buckets = res["bucket"]["rows"]  # the ds_config's fixed bucket, then the model's trainable size
    assert [r["reduce_bucket_size"] for r in buckets] == [50_000_000, res["bucket"]["trainable"]]
    assert all(r["status"] == "ok" for r in buckets) and 0 < res["bucket"]["trainable"] < 50_000_000

    # DeepSpeed's bf16 overflow scan on and off, measured side by side: where bf16 runs (zero2.json's "auto" is fp32
    # on a CPU without native bf16, e.g. an AVX2-only one, and then there is no scan to measure)
    if res["env"]["bf16"]:
        check = res["bucket"]["overflow_check"]
        assert [r["variant"] for r in check] == ["check_grad_overflow on (default)", "check_grad_overflow off"]
        assert all(r["status"] == "ok" and r["micro"] == 2 for r in check)
    else:
        assert "overflow_check" not in res["bucket"]
    opt = res["optimizer"]["rows"]  # torch AdamW foreach vs fused, at the best micro-batch
    assert [r["variant"] for r in opt] == ["torch AdamW, foreach (default)", "torch AdamW, fused=True"]
    assert all(r["status"] == "ok" and r["micro"] == buckets[0]["micro"] for r in opt)

    loader = res["loader"]  # the photos as they are, shard-coco --resize to the tower's input, their tower features
    assert [(r["shards"].split()[0], r["workers"]) for r in loader["rows"]] == [
        ("640x480", 0), ("640x480", 2), ("shard-coco", 0), ("shard-coco", 2), ("precompute-features", 0),
        ("precompute-features", 2)]
    for r in loader["rows"]:  # 24 photos, micro 4, one stream or two: the whole epoch arrives
        assert r["images"] == 24 and r["images_s"] > 0
    assert loader["precompute"]["images_s"] > 0 and loader["precompute"]["dtype"] == "fp32"  # auto on a CPU
    assert 60 < loader["mean_kib"] < 400  # COCO-like compressed size, not a flat synthetic image

    prof = res["decode"]["profile"]  # host work per token of each decoder, from a real profiled decode
    for name in ("greedy", "speculative", "greedy static", "speculative static"):
        assert prof[name]["tokens"] == 6 and prof[name]["aten_ops_per_token"] > 10 and prof[name]["top"]
        assert prof[name]["launches_per_token"] == prof[name]["syncs_per_token"] == 0  # no CUDA runtime on the CPU

    dec = res["decode"]["rows"]
    assert [r["batch"] for r in dec] == [1, 8]
    for r in dec:
        assert r["identical_rows"] == r["batch"]  # speculative decoding is greedy decoding, row for row
        assert r["static_identical_rows"] == r["batch"]  # and so are their fixed-shape (CUDA-graph) versions
        assert r["greedy_static_tokens_s"] > 0 and r["speculative_static_tokens_s"] > 0
        assert r["greedy_tokens"] == r["speculative_tokens"] > 0

    table = md.read_text()
    for heading in ("### Training step", "### Where a step goes", "### model.compile", "### ZeRO-2 reduce bucket", "### The optimizer", "### Loader", "### Decoding"):
        assert heading in table


def test_no_gpu_fails_fast_and_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--parts", "decode", "--append", "/dev/null"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU is visible" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_sdpa_detector_tells_fused_from_explicit():
    from benchlib.train_bench import sdpa_backends
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM

    found = {}
    for kind in ("sdpa", "explicit"):
        cfg = load_config("tiny", [f"model.attention={kind}"])
        torch.manual_seed(0)
        model = VLM(cfg.model).train()
        images = torch.randn(2, 3, 32, 32)
        ids = torch.randint(1, 100, (2, 5))
        found[kind] = sdpa_backends(model, images, ids)
    assert found["sdpa"] == ["flash (CPU kernel)"]
    assert found["explicit"][0].startswith("none")


def test_sweep_stops_at_oom_and_rebuilds_the_engine(monkeypatch):
    """A fake OOM above micro-batch 4 (checkpointing on) or 2 (off): the sweep keeps checkpointing-on rows
    going after the off rows stop fitting, stops at the first on-OOM, and rebuilds the engine after each."""
    import benchlib.train_bench as tb
    from vlm_dist.config import load_config
    from vlm_dist.model import VLM

    cfg = load_config("tiny")
    built = []

    def fake_engine(cfg_, ds, seed=0):
        torch.manual_seed(seed)
        module = VLM(cfg_.model)
        built.append(module)
        return SimpleNamespace(module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.0))

    def fake_step(engine, images, ids, targets):
        limit = 4 if engine.module.cfg.activation_checkpointing else 2
        if images.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        loss = engine.module(images, ids, targets)["loss"]
        loss.backward()
        return loss

    monkeypatch.setattr(tb, "build_trainer_engine", fake_engine)
    monkeypatch.setattr(tb, "engine_step", fake_step)
    bench = tb.TrainBench(cfg, {"bf16": {"enabled": False}}, torch.device("cpu"), warmup=0, steps=1, log=lambda m: None)
    rows = bench.sweep([1, 2, 4, 8, 16], ckpt_both=True)
    got = [(r["micro"], r["ckpt"], r["status"]) for r in rows]
    assert got == [(1, True, "ok"), (1, False, "ok"), (2, True, "ok"), (2, False, "ok"), (4, True, "ok"),
                   (4, False, "OOM"), (8, True, "OOM")]
    assert len(built) == 2  # the first; dropped at the off-OOM at 4; a fresh one for micro 8, dropped at its OOM
    assert bench.engine is None


def test_decode_part_measures_a_trained_export(tmp_path):
    """--decode-model: the decode part decodes demo scenes with an export's own weights and heads (the figure
    that random weights cannot give), not the preset's random model; a folder that is no export is refused."""
    from vlm_dist.config import load_config
    from vlm_dist.infer.export import save_export
    from vlm_dist.model import VLM

    torch.manual_seed(0)
    save_export(VLM(load_config("tiny", ["model.n_future=3"]).model).eval(), tmp_path / "export")
    out, md = tmp_path / "dec.json", tmp_path / "dec.md"
    cmd = [sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--cpu-smoke", "--parts", "decode", "--json", str(out),
           "--append", str(md)]
    proc = subprocess.run([*cmd, "--decode-model", str(tmp_path / "export")], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dec = json.loads(out.read_text())["decode"]
    assert dec["model"] == str(tmp_path / "export") and dec["n_future"] == 3  # the export's heads, not tiny's
    assert [r["batch"] for r in dec["rows"]] == [1, 8]
    for r in dec["rows"]:
        assert r["identical_rows"] == r["static_identical_rows"] == r["batch"] and r["greedy_tokens"] > 0
    assert "the trained export" in md.read_text()
    bad = subprocess.run([*cmd, "--decode-model", str(tmp_path)], env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "not an export folder" in bad.stderr, bad.stderr[-2000:]
