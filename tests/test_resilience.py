"""Training that survives, as real multi-process runs on the CPU (gloo): kills inside a save, SIGTERM,
the deepspeed runner killed, resume on another world size (elastic), a changed shape refused,
non-finite steps skipped or stopping the run. docs/RELIABILITY.md lists these faults and their tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, free_port, losses, make_demo_shards, metrics, run_ranks, start_ranks, train_env
from vlm_dist.train.checkpoint import incomplete_reason, read_meta
from vlm_dist.train.preempt import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

STEPS = 10  # 64 samples / global batch 8 = 8 steps per epoch: the runs cross an epoch boundary


def common(shards, run_dir, *extra):
    return ["--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--run-dir", str(run_dir), "--max-steps", str(STEPS),
            "--set", "data.shuffle_buffer=8", "--set", "log.sample_keys=true", "--set", "train.keep_last=10",
            "--ds-set", "bf16.enabled=false", "--ds-set", "optimizer.params.lr=0.001",
            "--ds-set", "scheduler.params.warmup_num_steps=2", "--ds-set", "train_micro_batch_size_per_gpu=4",
            "--save-every", "2", "--eval-every", "3", *extra]


@pytest.fixture(scope="module")
def shards(module_dir):
    return make_demo_shards(module_dir("resilience") / "data")


@pytest.fixture(scope="module")
def reference(shards, module_dir):
    """The uninterrupted 2-rank run every fault is compared with."""
    run = module_dir("ref") / "run"
    run_ranks(common(shards, run), 2)
    return run


def assert_same_losses(run: Path, ref: Path, tol: float = 1e-6) -> None:
    got, want = metrics(run), losses(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step logged exactly once"
    for r in got:
        assert abs(r["loss"] - want[r["step"]]) <= tol, (r["step"], r["loss"], want[r["step"]])


def sample_log(run: Path) -> dict[int, list[str]]:
    """step -> the sorted keys of every sample of the step, over all ranks (from log.sample_keys)."""
    out: dict[int, list[str]] = {}
    for path in sorted((run / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["keys"])
    return {step: sorted(keys) for step, keys in out.items()}


# Each fault SIGKILLs the whole job at one point of one save; `best` is saved at steps 3, 6, 9 (eval_every 3).
FAULTS = ["saved:1@step4", "meta@step4", "swap@best", "published@step6", "saved:0@best"]


@pytest.mark.parametrize("fault", FAULTS)
def test_kill_inside_a_save_resumes_exactly(shards, reference, tmp_path, fault):
    run = tmp_path / "run"
    killed = run_ranks(common(shards, run), 2, expect=None, VLM_DIST_FAULT=fault)
    assert all(r.returncode == -signal.SIGKILL for r in killed), [r.returncode for r in killed]
    out = run_ranks(common(shards, run), 2)[0].stdout  # --resume auto
    assert "resumed from" in out
    assert_same_losses(run, reference)
    best = run / "checkpoints" / "best"
    assert incomplete_reason(best) is None
    assert read_meta(best)["state"] == read_meta(reference / "checkpoints" / "best")["state"]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob(".old-*"))


def test_sigterm_saves_and_resumes_exactly(shards, reference, tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(common(shards, run), 2)
    log = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"step": 4, "split": "train"' in log.read_text()):
        time.sleep(0.2)
    sent = time.time()
    procs[1].send_signal(signal.SIGTERM)  # one rank's signal is enough
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, outs[0][-3000:]
    assert time.time() - sent < 60
    assert "stopped: stop requested (on another rank)" in outs[0]
    stopped = max(r["step"] for r in metrics(run))
    tag = outs[0].split("saved ")[1].split()[0]  # stepN, or epochE where the stop fell on an epoch's end
    assert 4 <= stopped < STEPS and f"at step {stopped} " in outs[0] and (run / "checkpoints" / tag).is_dir()
    run_ranks(common(shards, run), 2)
    assert_same_losses(run, reference)
    assert sample_log(run) == sample_log(reference)


def test_sigterm_to_the_deepspeed_runner_leaves_no_orphans(shards, tmp_path):
    run = tmp_path / "run-runner"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "vlm_dist.train", *common(shards, run, "--max-steps", "200")]
    runner = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    log = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"step": 3, "split": "train"' in log.read_text()):
        time.sleep(0.2)
    logged = max(r["step"] for r in metrics(run))
    runner.send_signal(signal.SIGTERM)
    out = runner.communicate(timeout=180)[0]  # the ranks inherit its stdout: EOF once they are gone too
    deadline = time.time() + 120
    while time.time() < deadline and _job_processes(run):
        time.sleep(0.5)
    assert _job_processes(run) == []
    said = [line for line in out.splitlines() if "stopped: stop requested (the deepspeed runner" in line]
    assert len(said) == 1 and "exits with return code = 75" in out, out[-3000:]
    tag, stopped = said[0].split("saved ")[1].split()[0], int(said[0].split(" at step ")[1].split()[0])
    assert stopped > logged and incomplete_reason(run / "checkpoints" / tag) is None


def _job_processes(run: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(run) in line and "ps -eo" not in line]


@pytest.mark.parametrize("before,after,stage", [(2, 1, 2), (1, 2, 2), (1, 2, 3)])
def test_elastic_resume_on_another_world_size(shards, tmp_path, before, after, stage):
    """Same 2 data streams and global batch 8 either way: 2 ranks x 1 worker x micro 4, or 1 rank x 2
    workers x micro 4 x accumulation 2. Stopped after 5 steps, continued on the other world size. ZeRO-3's
    universal load tied the sub-groups' Adam step counters and gave every param group group 0's weight decay
    (Engine._untie_zero3_steps, Engine.replan): both fail this test."""
    zero = ["--ds-set", f"zero_optimization.stage={stage}"]
    split = {2: ["--set", "data.num_workers=1", *zero],
             1: ["--set", "data.num_workers=2", "--ds-set", "gradient_accumulation_steps=2", *zero]}
    ref = tmp_path / "ref"
    run_ranks(common(shards, ref, *split[before]), before)
    run = tmp_path / "run"
    run_ranks(common(shards, run, *split[before], "--stop-after", "5"), before)
    refused = run_ranks(common(shards, run, *split[after]), after, expect=2)
    assert "Pass --elastic" in refused[0].stdout
    out = run_ranks(common(shards, run, *split[after], "--elastic"), after)[0].stdout
    assert "elastic resume" in out
    assert_same_losses(run, ref, tol=1e-5)  # another reduction order: equal to float32 rounding
    got, want = sample_log(run), sample_log(ref)
    assert got == want  # every step saw the same samples
    epoch0 = [k for step in range(1, 9) for k in got[step]]
    assert len(epoch0) == len(set(epoch0)) == 64  # each sample once in the epoch that was interrupted


def test_changed_micro_batch_is_refused(shards, reference, tmp_path):
    run = tmp_path / "run"
    run_ranks(common(shards, run, "--stop-after", "2"), 2)
    out = run_ranks(common(shards, run, "--ds-set", "train_micro_batch_size_per_gpu=2"), 2, expect=2)
    text = "".join(r.stdout for r in out)
    assert text.count("error: the checkpoint was made by a run of another shape") == 1  # once, from rank 0
    assert "micro_batch: checkpoint 4, this run 2" in text and "Traceback" not in text


def test_nonfinite_step_is_skipped_on_all_ranks(shards, tmp_path):
    run = tmp_path / "run"
    # log_every 4: step 3 does not log, so its losses are read only once the engine has skipped it.
    run_ranks(common(shards, run, "--save-every", "1", "--set", "log.log_every=4"), 2,
              VLM_DIST_INJECT_NAN="3:1")  # rank 1's batch only
    recs = {r["step"]: r for r in metrics(run)}
    assert sorted(recs) == [3, 4, 8, STEPS]  # the skipped step logs too
    assert recs[3]["skipped"] == 1.0 and recs[3]["loss"] == "nan"
    assert recs[STEPS]["skipped_steps"] == 1.0 and all(recs[s]["skipped"] == 0.0 for s in recs if s != 3)

    def weights(tag):
        return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]

    w2, w3, w4 = weights("step2"), weights("step3"), weights("step4")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the poisoned step changed nothing
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the next one trains again
    assert all(torch.isfinite(v).all() for v in w4.values() if v.is_floating_point())


def test_nonfinite_steps_in_a_row_stop_the_run(shards, tmp_path):
    run = tmp_path / "run"
    # log_every 4: step 5 does not log, but its loss is read before the update (the third in a row).
    out = run_ranks(common(shards, run, "--set", "log.log_every=4"), 2, expect=2, VLM_DIST_INJECT_NAN="3:0,4:0,5:0")
    text = "".join(r.stdout for r in out)
    assert text.count("error: 3 step(s) in a row up to step 5 had non-finite gradients") == 1
    assert "first layer whose gradient went non-finite: vision" in text
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step4'} (step 4)" in text
    assert "Traceback" not in text

    # The count is part of the checkpoint: stopped after step 4 (steps 3 and 4 skipped), the resumed run stops at
    # step 5 as well.
    again = tmp_path / "again"
    run_ranks(common(shards, again, "--set", "log.log_every=4", "--stop-after", "4"), 2, VLM_DIST_INJECT_NAN="3:0,4:0")
    out = run_ranks(common(shards, again, "--set", "log.log_every=4", "--resume", "auto"), 2, expect=2,
                    VLM_DIST_INJECT_NAN="5:0")
    text = "".join(r.stdout for r in out)
    assert text.count("error: 3 step(s) in a row up to step 5 had non-finite gradients") == 1, text[-3000:]
