"""Real multi-process DeepSpeed runs on the CPU (gloo): 1 rank == 2 ranks, ZeRO 1 == 2 == 3,
resume == uninterrupted, bf16 learns, checkpoint retention and `best`. Each run is a few seconds of
training after ~10 s of start-up, so the runs are shared by the tests through one fixture."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import losses, make_demo_shards, metrics, run_ranks

pytestmark = pytest.mark.slow

STEPS = 10  # 64 samples / global batch 8 = 8 steps per epoch: the runs cross an epoch boundary


def common(shards, run_dir, *extra):
    return ["--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--run-dir", str(run_dir), "--max-steps", str(STEPS),
            "--set", "data.shuffle_buffer=8",
            "--ds-set", "bf16.enabled=false", "--ds-set", "optimizer.params.lr=0.001",
            "--ds-set", "scheduler.params.warmup_num_steps=2", *extra]


@pytest.fixture(scope="module")
def runs(module_dir):
    root = module_dir("dist")
    shards = make_demo_shards(root / "data")
    out = {}

    def go(name, world, *extra, **kw):
        rank0 = run_ranks(common(shards, root / name, *extra), world, **kw)[0]
        out[name] = root / name
        out[f"{name} log"] = rank0.stdout

    # Same global batch of 8: one rank with 2 streams x micro 4 x accumulation 2, or two ranks x micro 4
    # (the data streams are the same two slots either way). No dropout: its masks depend on the rank.
    go("one_rank", 1, "--set", "data.num_workers=2", "--ds-set", "train_micro_batch_size_per_gpu=4",
       "--ds-set", "gradient_accumulation_steps=2", "--save-every", "100")
    # ... which also decodes val images on rank 0 every 5 steps (must not disturb training)
    go("two_ranks", 2, "--ds-set", "train_micro_batch_size_per_gpu=4", "--save-every", "100",
       "--set", "train.generate_every=5", "--set", "train.generate_images=4")
    # With dropout, whose random streams must survive the checkpoint for the resume test.
    drop = ["--set", "model.dropout=0.1", "--ds-set", "train_micro_batch_size_per_gpu=4", "--save-every", "3"]
    for stage in (1, 2, 3):  # ZeRO-3 is asked to compile, which it cannot: it must say so and run eager
        go(f"zero{stage}", 2, *drop, "--ds-set", f"zero_optimization.stage={stage}", "--eval-every", "2",
           "--set", "train.keep_last=2", *(["--set", "model.compile=true"] if stage == 3 else []))
    # Stopped after step 5 (mid-epoch; --stop-after saves a checkpoint there), then resumed.
    go("resumed", 2, *drop, "--stop-after", "5")
    first_session = losses(root / "resumed")
    go("resumed", 2, *drop, "--resume", "auto")
    out["first_session"] = first_session
    return out


def test_one_rank_equals_two_ranks(runs):
    one, two = losses(runs["one_rank"]), losses(runs["two_ranks"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert one[STEPS] < one[1]  # and it trains
    # the gradient too, not only the losses: clipped AdamW takes the same steps from gradients twice as large, so a
    # sum of the ranks' gradients where their mean belongs would leave every loss equal (found by mutation testing)
    assert_same_grad_norms(runs["one_rank"], runs["two_ranks"])


def assert_same_grad_norms(a, b, tol=1e-5):
    na, nb = ({m["step"]: m["grad_norm"] for m in metrics(run) if "grad_norm" in m} for run in (a, b))
    assert len(na) == STEPS and na.keys() == nb.keys(), (na, nb)
    for step in na:
        assert abs(na[step] - nb[step]) <= tol * na[step], (step, na[step], nb[step])


def test_generation_eval_during_training(runs, tmp_path):
    """Rank 0's in-training generation eval at step 10 gives what `vlm-dist eval` gives on the export of the step-10
    checkpoint (the same weights, images and decoding), metric for metric."""
    from vlm_dist.infer.evaluate import evaluate_generation
    from vlm_dist.infer.export import export
    from vlm_dist.infer.load import load_exported

    records = metrics(runs["two_ranks"], "val_generate")
    assert [r["step"] for r in records] == [5, 10]
    assert all(r["images"] == 4 and "CIDEr" in r and "BLEU-4" in r for r in records)
    model, _ = load_exported(export(runs["two_ranks"] / "checkpoints", tmp_path / "export", tag="step10"))
    val = runs["two_ranks"].parent / "data" / "shards" / "val"
    want = evaluate_generation(model, str(val), limit=4, progress=False, meteor=False)["metrics"]
    got = records[-1]
    keys = [k for k, v in want.items() if isinstance(v, (int, float)) and k != "decode_tokens_per_s"]
    assert "caption_exact_match" in keys and "CIDEr" in keys
    assert {k: got[k] for k in keys} == {k: float(want[k]) for k in keys}


def test_zero_stages_agree(runs):
    assert "compile: false" in (runs["zero3"] / "config.yaml").read_text()  # what ran: eager, and the log says why
    assert "model.compile=true is not used under ZeRO-3" in runs["zero3 log"]
    ref = losses(runs["zero2"])
    for stage in (1, 3):
        other = losses(runs[f"zero{stage}"])
        for step in ref:
            assert abs(ref[step] - other[step]) <= 1e-5, (stage, step, ref[step], other[step])
        assert_same_grad_norms(runs["zero2"], runs[f"zero{stage}"])


def test_resume_equals_uninterrupted(runs):
    ref, resumed = losses(runs["zero2"]), runs["resumed"]
    first = runs["first_session"]
    assert sorted(first) == [1, 2, 3, 4, 5]
    records = metrics(resumed)  # both sessions append to one metrics.jsonl
    second = {r["step"]: r["loss"] for r in records[len(first):]}
    assert sorted(second) == list(range(6, STEPS + 1))  # across the epoch boundary at step 8 too
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step*"))[-1] == "step9"
    for step in range(1, STEPS + 1):
        got = first[step] if step <= 5 else second[step]
        assert abs(got - ref[step]) <= 1e-5, (step, got, ref[step])


def test_checkpoint_retention_and_best(runs):
    ckpts = runs["zero2"] / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step*"))
    assert steps == ["step10", "step9"]  # keep_last=2 of step3, step6, step9, step10
    assert (ckpts / "epoch1").is_dir()  # epoch 0 ends at step 8 and is kept
    val = metrics(runs["zero2"], "val")
    best = min(val, key=lambda r: r["loss"])
    state = torch.load(ckpts / "best" / "mp_rank_00_model_states.pt", weights_only=False)["train_state"]
    assert state["step"] == best["step"] and abs(state["best_val"] - best["loss"]) < 1e-9
    assert (ckpts / "latest").read_text().strip() == "step10"


def test_bf16_runs_and_learns(tmp_path):
    shards = make_demo_shards(tmp_path / "data", n_train=32, n_val=8)
    args = ["--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(shards / "train"),
            "--run-dir", str(tmp_path / "run"), "--max-steps", "24", "--ds-set", "train_micro_batch_size_per_gpu=8",
            "--ds-set", "optimizer.params.lr=0.003", "--ds-set", "scheduler.params.warmup_num_steps=2",
            "--ds-set", "bf16.enabled=true",  # explicit: "auto" would pick fp32 on CPUs without native bf16
            "--save-every", "100"]
    run_ranks(args, 2)
    cfg = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert cfg["bf16"]["enabled"] is True
    l = losses(tmp_path / "run")
    first, last = sum(l[s] for s in (1, 2, 3)) / 3, sum(l[s] for s in (22, 23, 24)) / 3
    assert last < 0.85 * first, (first, last)  # ~21.6 -> ~17 here; a run that does not learn stays at ~21.6
