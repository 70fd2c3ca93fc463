"""What crash safety costs and how fast a job stops, at the demo preset on 2 ranks.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_resilience.py --json runs/bench_resilience.json

1. save: the atomic save (train/checkpoint.py: temporary tag, checkpoint.json, rename, `latest` by
   rename) against the plain one it replaced (DeepSpeed's save_checkpoint writing `latest` itself,
   then each rank's RNG file and rank 0's run_config.json), alternated `--repeats` times in one
   2-rank job, medians of the per-save wall time (max over ranks, from barrier to barrier).
2. stop: `deepspeed --num_gpus 2 --module vlm_dist.train --config demo` on a small demo set, SIGTERM
   after a few steps to (a) the runner's process group, (b) the runner alone, (c) one rank, and SIGINT to
   the group (d, Ctrl-C); time from the signal until no process of the job is left, the exit code, the
   step saved.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def save_worker(spec: dict) -> dict:
    import torch

    from vlm_dist.config import load_config
    from vlm_dist.model import VLM
    from vlm_dist.train import checkpoint as ckpt
    from vlm_dist.train.dist import barrier
    from vlm_dist.train.dsconfig import load_ds_config
    from vlm_dist.train.engine import Engine, init_distributed

    info = init_distributed()
    cfg = load_config("demo")
    ds = load_ds_config(REPO / "ds_configs/demo_zero2.json", ["bf16.enabled=false"])
    ds["scheduler"]["params"]["total_num_steps"] = 100
    torch.manual_seed(0)
    engine = Engine(VLM(cfg.model), ds)
    root = Path(spec["dir"])
    config = cfg.model_dump(mode="json")
    state = ckpt.TrainState(step=1)

    def plain(tag):  # the save this project had before the atomic one
        engine._ds.save_checkpoint(str(root / "plain"), tag=tag, client_state={"train_state": {}, "config": config})
        torch.save(ckpt._rng_state(), root / "plain" / tag / f"rng_rank{info.rank}.pt")
        if info.is_main:
            (root / "plain" / tag / ckpt.RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        barrier()

    def atomic(tag):
        ckpt.save(engine, root / "atomic", tag, state, config, {"bench": True}, info.world_size)

    times: dict[str, list[float]] = {"plain": [], "atomic": []}
    for i in range(spec["repeats"]):
        for name, fn in (("plain", plain), ("atomic", atomic)) if i % 2 == 0 else (("atomic", atomic), ("plain", plain)):
            barrier()
            t0 = time.perf_counter()
            fn(f"step{i}")
            times[name].append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in (root / "atomic" / "step0").iterdir())
    return {"rank": info.rank, "times": times, "bytes": size}


def bench_save(work: Path, repeats: int) -> dict:
    from vlm_dist.train.dist import free_port

    port, procs = str(free_port()), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        spec = json.dumps({"dir": str(work / "save"), "repeats": repeats})
        procs.append(subprocess.Popen([sys.executable, __file__, "--save-worker", spec], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        out = p.communicate(timeout=1800)[0]
        if p.returncode:
            raise RuntimeError(out[-4000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    per = {k: [max(r["times"][k][i] for r in results) for i in range(repeats)] for k in ("plain", "atomic")}
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"repeats": repeats, "bytes": results[0]["bytes"], "plain_s": per["plain"], "atomic_s": per["atomic"],
            "median_plain_s": med["plain"], "median_atomic_s": med["atomic"], "ratio": med["atomic"] / med["plain"],
            "paired_ratio_median": statistics.median(a / p for a, p in zip(per["atomic"], per["plain"]))}


def job_processes(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


def bench_stop(work: Path, target: str, data: Path) -> dict:
    from vlm_dist.train.dist import free_port

    run = work / f"stop-{target}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "vlm_dist.train", "--config", "demo", "--ds", "ds_configs/demo_zero2.json",
           "--ds-set", "bf16.enabled=false", "--train-shards", str(data / "shards/train"), "--run-dir", str(run),
           "--max-steps", "500", "--save-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    runner = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    log = run / "metrics.jsonl"
    while not (log.is_file() and log.read_text().count('"split": "train"') >= 3):
        if runner.poll() is not None:
            raise RuntimeError(runner.stdout.read()[-4000:])
        time.sleep(0.1)
    t0 = time.perf_counter()
    if target == "group":
        os.killpg(runner.pid, signal.SIGTERM)
    elif target == "ctrl-c":
        os.killpg(runner.pid, signal.SIGINT)
    elif target == "runner":
        runner.send_signal(signal.SIGTERM)
    else:  # one rank
        rank = next(line for line in job_processes(str(run)) if "--local_rank=1" in line)
        os.kill(int(rank.split()[0]), signal.SIGTERM)
    out = runner.communicate(timeout=300)[0]
    while job_processes(str(run)):
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    saved = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    said = next((line for line in out.splitlines() if "stopped: stop requested" in line), "")
    return {"target": target, "seconds_to_no_process": seconds, "runner_exit": runner.returncode,
            "saved": saved, "message": said.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--work", type=Path, default=REPO / "runs/bench_resilience")
    ap.add_argument("--parts", default="save,stop", help="comma-separated: save, stop [save,stop]")
    ap.add_argument("--save-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.save_worker:
        print(json.dumps(save_worker(json.loads(args.save_worker))))
        return
    import shutil

    from vlm_dist.data.demo import make_demo_data
    from vlm_dist.data.shard import shard_coco

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    paths = make_demo_data(data, 512, 16, seed=0)["train"]
    shard_coco(paths["images"], [paths["captions"]], data / "shards/train", vqa_questions=paths["vqa_questions"],
               vqa_annotations=paths["vqa_annotations"], split="train", shard_size=128, progress=False)
    parts = args.parts.split(",")
    results = {"cpu": _cpu()}
    if "save" in parts:
        results["save"] = s = bench_save(args.work, args.repeats)
        print(f"save, demo preset, 2 ranks, {s['bytes'] / 2**20:.0f} MiB per tag: plain {s['median_plain_s']:.3f} s, "
              f"atomic {s['median_atomic_s']:.3f} s (medians of {s['repeats']}): atomic/plain = {s['ratio']:.2f}, "
              f"median of the paired ratios {s['paired_ratio_median']:.2f}")
    if "stop" in parts:
        results["stop"] = [bench_stop(args.work, t, data) for t in ("group", "ctrl-c", "runner", "rank")]
    print(f"CPU: {results['cpu']} (at start), {_cpu()} (at end)")
    for r in results.get("stop", []):
        what = "SIGINT to the group (Ctrl-C)" if r["target"] == "ctrl-c" else f"SIGTERM to the {r['target']}"
        print(f"{what}: no process left after {r['seconds_to_no_process']:.1f} s, runner exit "
              f"{r['runner_exit']}, saved {r['saved']}; {r['message']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


if __name__ == "__main__":
    main()
