"""Step-time cost of rank-0 observability (TensorBoard scalars, per-layer gradient statistics under
ZeRO, histograms) at the demo preset's intervals, against logging off.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=.torch_extensions \
        .venv/bin/python tools/bench_logging.py --steps 14 --rounds 4 [--json out.json]

One process (world size 1, DeepSpeed ZeRO-2 from ds_configs/demo_zero2.json, demo preset) trains a
fresh run per arm, the arms alternating, their order rotated each round (a Latin square over 4
rounds), all from the same seed and data. A step's time is the wall time from one `train_step` call
to the next, so it includes everything the loop does between steps (writing scalars) and inside
(the gradient observer's gathers); it is also split into the part inside `train_step` and the part
between steps; the first 2 steps of each run are dropped as warm-up. Arms:

    off      tensorboard off, no scalars written, grad stats and histograms off
    scalars  scalars every step (TensorBoard + metrics.jsonl)
    grads    + per-layer gradient statistics every step (full-gradient and fp32-weight gathers)
    hists    + weight and gradient histograms every step

Per-event costs are differences of medians (scalars − off, grads − scalars, hists − grads); the cost
at the preset's intervals (log_every, grad_stats_every, histograms_every) is their amortised sum,
reported as a ratio to the median step with logging off. Eval-time token images are timed apart
(rendering log.token_images comparisons + the accuracy plot, outside training steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ARMS = {
    "off": ["log.tensorboard=false", "log.log_every=1000000", "log.grad_stats_every=0", "log.histograms_every=0"],
    "scalars": ["log.log_every=1", "log.grad_stats_every=0", "log.histograms_every=0"],
    "grads": ["log.log_every=1", "log.grad_stats_every=1", "log.histograms_every=0"],
    "hists": ["log.log_every=1", "log.grad_stats_every=1", "log.histograms_every=1"],
}


def make_shards(root: Path, n_train: int) -> Path:
    from vlm_dist.data.demo import make_demo_data
    from vlm_dist.data.shard import shard_coco

    for name, paths in make_demo_data(root, n_train, 16, seed=0, side=32).items():
        shard_coco(paths["images"], [paths["captions"]], root / "shards" / name, vqa_questions=paths["vqa_questions"],
                   vqa_annotations=paths["vqa_annotations"], split=name, shard_size=64, progress=False)
    return root / "shards"


def time_run(arm: str, steps: int, shards: Path, work: Path, ds: str) -> dict[str, list[float]]:
    """Train one fresh run of `steps` steps with the arm's logging: per-step times (s), whole cycle
    ("step"), inside train_step ("inside"), its gradient-observer part ("observe")."""
    from vlm_dist.config import load_config
    from vlm_dist.train import loop

    cfg = load_config("demo", [f"data.train_shards={shards / 'train'}", f"train.max_steps={steps}",
                               "train.save_every=1000000", "data.num_workers=1", *ARMS[arm]])
    starts: list[float] = []
    inside: list[dict] = []
    inner = loop.train_step

    def timed(run, batches):
        starts.append(time.perf_counter())
        metrics = inner(run, batches)
        inside.append(metrics)
        return metrics

    loop.train_step = timed
    run_dir = work / f"run-{arm}"
    try:
        loop.train(cfg, loop.RunOptions(ds=ds, run_dir=str(run_dir), resume="none"))
    finally:
        loop.train_step = inner
        shutil.rmtree(run_dir, ignore_errors=True)
        gc.collect()
    cycles = [b - a for a, b in zip(starts, starts[1:])]  # the last step has no successor
    return {"step": cycles[2:], "inside": [m["step_time"] for m in inside[2:len(cycles)]],
            "observe": [m.get("time_observe", 0.0) for m in inside[2:len(cycles)]]}  # drop warm-up


def time_token_images(n: int, reps: int = 5) -> float:
    """Seconds to render n comparison images + the position-accuracy plot (the demo's shapes)."""
    import torch

    from vlm_dist.config import load_config
    from vlm_dist.observe.tokens import render_comparison, render_position_accuracy, unnormalise

    cfg = load_config("demo")
    k, T = cfg.model.n_future, cfg.data.max_text_len - 1
    targets = torch.randint(0, 49000, (k, T))
    targets[:, 20:] = -100
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            render_comparison(targets, targets.clamp(min=0), unnormalise(torch.randn(3, 32, 32)))
        render_position_accuracy(torch.rand(k, T), torch.ones(k, T))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summarise(runs: dict[str, dict[str, list[float]]], images: float) -> dict:
    """Print the table and the cost at the demo intervals, estimated two ways: from differences of
    step medians (noisy under load), and from the directly timed parts (the between-steps delta for
    scalars, the gradient observer's own timer for statistics and histograms)."""
    from vlm_dist.config import load_config

    log = load_config("demo").log
    med = {arm: statistics.median(v["step"]) for arm, v in runs.items()}
    between = {arm: statistics.median([c - i for c, i in zip(v["step"], v["inside"])]) for arm, v in runs.items()}
    observe = {arm: statistics.median(v["observe"]) for arm, v in runs.items()}
    by_medians = {"scalars": med["scalars"] - med["off"], "grads": med["grads"] - med["scalars"],
                  "hists": med["hists"] - med["grads"]}
    direct = {"scalars": between["scalars"] - between["off"], "grads": observe["grads"],
              "hists": observe["hists"] - observe["grads"]}
    every = {"scalars": log.log_every, "grads": log.grad_stats_every, "hists": log.histograms_every}
    print("\n| arm | steps | median step (s) | min..max (s) | median / off | inside train_step (s) | "
          "between steps (s) | grad observer (s) |\n|---|---|---|---|---|---|---|---|")
    for arm, v in runs.items():
        print(f"| {arm} | {len(v['step'])} | {med[arm]:.4f} | {min(v['step']):.4f}..{max(v['step']):.4f} | "
              f"{med[arm] / med['off']:.3f} | {statistics.median(v['inside']):.4f} | {between[arm]:.4f} | "
              f"{observe[arm]:.4f} |")
    out = {"median": med}
    print(f"\nat the demo intervals (log_every={log.log_every}, grad_stats_every={log.grad_stats_every}, "
          f"histograms_every={log.histograms_every}), per-event costs and their amortised sum:")
    for name, cost in (("differences of step medians", by_medians), ("directly timed parts", direct)):
        amortised = sum(cost[k] / every[k] for k in cost)
        out[name] = {"cost": cost, "amortised_s": amortised}
        print(f"  {name}: scalars {cost['scalars'] * 1e3:.1f} ms, grad stats {cost['grads'] * 1e3:.1f} ms, "
              f"histograms {cost['hists'] * 1e3:.1f} ms -> +{amortised * 1e3:.2f} ms per step = "
              f"{(med['off'] + amortised) / med['off']:.4f} x the median step with logging off")
    print(f"token images at each eval ({log.token_images} samples + accuracy plot, outside the steps): "
          f"{images * 1e3:.1f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=14, help="steps per run (the first 2 are warm-up)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the four arms, order rotated each round")
    p.add_argument("--ds", default="ds_configs/demo_zero2.json")
    p.add_argument("--json", help="write the raw per-step times here")
    args = p.parse_args(argv)

    from vlm_dist.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench_logging_"))
    try:
        shards = make_shards(work / "data", n_train=256)
        names = list(ARMS)
        runs: dict[str, dict[str, list[float]]] = {arm: {"step": [], "inside": [], "observe": []} for arm in ARMS}
        for r in range(args.rounds):
            for arm in names[r % 4:] + names[:r % 4]:
                for key, values in time_run(arm, args.steps, shards, work, args.ds).items():
                    runs[arm][key] += values
                print(f"round {r + 1}/{args.rounds} {arm}: median {statistics.median(runs[arm]['step']):.4f} s",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = time_token_images(load_config("demo").log.token_images)
    summary = summarise(runs, images)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "token_images_s": images, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
