"""CPU data throughput: `vlm-dist shard-coco` vs `tar cf`, and the loader vs a naive PIL + torchvision pipeline.

    python tools/bench_data.py                      # 400 photos, 3 interleaved rounds (~2-3 min on 2 cores)
    python tools/bench_data.py --photos 64 --rounds 1 --json data.json      # quick

Inputs: --photos COCO-sized photo-like JPEGs (640x480, ~130 KiB each, tools/benchlib/photos.py) and
a COCO captions file for them (2 captions per image), made once in --workdir and read from the page
cache by every variant alike.

1. Writing shards, images/s (wall time of the command, interpreter start-up included, each into a
   freshly emptied folder; all variants use --shard-size 50 so that --workers 2 has shards to share):
     tar            `tar cf OUT.tar -C PHOTOS images`                     (the I/O floor, no fsync)
     tar + fsync    the same followed by `sync OUT.tar`      (shard-coco fsyncs every shard it writes)
     shard-coco     `python -m vlm_dist.cli shard-coco --images ... --ann ... --out ... --no-progress`
                    (verifies every JPEG, decodes it at 1/8 scale to catch truncation, hashes it,
                    writes .jpg/.json/.txt members, fsyncs; bytes kept as they are)
     --workers 2, and --resize 256 (decode at reduced size via JPEG draft, resize, re-encode).
   The variants run in turn, the order rotating each round; medians over rounds. Ratios are
   shard-coco images/s over tar images/s (target >= 0.8 without resize).
2. Loader, images/s per worker (this process with torch.set_num_threads(1), the loader workers' setting):
     naive          Image.open(path).convert("RGB") -> torchvision Resize(224, bicubic) -> CenterCrop(224)
                    -> ToTensor -> Normalize (open_clip's transform, full-size decode), per file
     ImageToTensor  the loader's image path alone on the same files (draft-mode decode at 320x240, then
                    the same transform): vlm_dist.data.samples.ImageToTensor
     loader, 0 workers   vlm_dist.data.loader.build_loader over the shards, in this process: tar
                    reading, shuffle buffer, decode, tokenisation, targets, collation (micro-batch 16)
     loader, 1 worker    the same in one DataLoader worker process (batches cross a process boundary)
   Interleaved rounds, medians; ratios over naive (target >= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: benchlib
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_now() -> float:
    """CPU seconds (user + system) of this process and of every child process it has waited for
    (children's waited-for descendants included: shard-coco's pool, DataLoader workers, tar)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn, images: int | None = None) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of fn(); fn returns the image count or None (= images)."""
    t, c = time.perf_counter(), cpu_now()
    got = fn()
    return (got if got is not None else images), time.perf_counter() - t, cpu_now() - c


def run_cmd(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


# --- 1. shard writing ------------------------------------------------------------------------------

def shard_variants(photos: dict, out: Path, shard_size: int) -> dict:
    """name -> callable running it once into an emptied folder; returns (images, wall s, CPU s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def fresh() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    def tar(fsync: bool):
        def run():
            dest = fresh() / "photos.tar"
            cmd = ["tar", "cf", str(dest), "-C", str(photos["images"].parent), photos["images"].name]
            if fsync:
                cmd = ["sh", "-c", " ".join(cmd) + f" && sync {dest}"]
            return measured(lambda: run_cmd(cmd), photos["n"])
        return run

    def shard(*extra: str):
        def run():
            out_dir = fresh()
            return measured(lambda: run_cmd(
                [sys.executable, "-m", "vlm_dist.cli", "shard-coco", "--images", str(photos["images"]), "--ann",
                 str(photos["ann"]), "--out", str(out_dir), "--no-progress", "--shard-size", str(shard_size), *extra],
                env=env), photos["n"])
        return run

    return {"tar": tar(False), "tar + fsync": tar(True), "shard-coco": shard(),
            "shard-coco --workers 2": shard("--workers", "2"), "shard-coco --resize 256": shard("--resize", "256")}


def interleave(variants: dict, rounds: int, log) -> dict[str, list[tuple]]:
    """Each variant once per round, the order rotating; -> name: [(images, wall s, CPU s) per round]."""
    names = list(variants)
    times: dict[str, list[tuple]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:  # rotate the order each round: load drift hits all alike
            times[n].append(variants[n]())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1][1]:.2f} s" for n in names))
    return times


# --- 2. loader vs naive ----------------------------------------------------------------------------

def loader_variants(cfg, photos: dict, shards: Path, micro: int) -> dict:
    """name -> callable returning (images, wall s, CPU s)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from benchlib.loader_bench import loader_throughput
    from vlm_dist.data.samples import ImageToTensor

    size = cfg.model.vision.geometry["image_size"]
    to_tensor = ImageToTensor(size)
    norm = to_tensor.transform.transforms[-1]  # open_clip's Normalize (its mean and std)
    naive_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize(norm.mean, norm.std)])
    files = photos["files"]

    def naive():
        for f in files:
            x = naive_tf(Image.open(f).convert("RGB"))
        assert x.shape == (3, size, size)
        return len(files)

    def itt():
        for f in files:
            x = to_tensor(f.read_bytes())
        assert x.shape == (3, size, size)
        return len(files)

    def loader(workers: int):
        return lambda: loader_throughput(cfg, shards, workers, micro)["images"]

    torch.set_num_threads(1)
    named = {"naive PIL + torchvision": naive, "ImageToTensor (draft decode)": itt,
             "loader, 0 workers": loader(0), "loader, 1 worker": loader(1)}
    return {name: (lambda fn=fn: measured(fn)) for name, fn in named.items()}


def table(runs: dict[str, list[tuple]], what: str, refs: list[str]) -> list[str]:
    """Medians of images/s by wall time and by CPU time, and the ratios to each reference variant:
    of the medians, and paired (median over rounds of the ratio within the round)."""
    def rates(name: str, k: int) -> list[float]:
        return [r[0] / r[k] for r in runs[name]]

    med = lambda xs: statistics.median(xs)  # noqa: E731
    head = f"| {what} | wall s: median (min..max) | images/s (wall) | images/CPU-s |"
    for ref in refs:
        head += f" vs {ref}: wall / paired wall / CPU |"
    lines = [head, "|" + "---|" * (4 + len(refs))]
    for n in runs:
        wall = [r[1] for r in runs[n]]
        row = (f"| {n} | {med(wall):.3f} ({min(wall):.3f}..{max(wall):.3f}) | {med(rates(n, 1)):.0f} "
               f"| {med(rates(n, 2)):.0f} |")
        for ref in refs:
            paired = med([a / b for a, b in zip(rates(n, 1), rates(ref, 1))])
            row += (f" {med(rates(n, 1)) / med(rates(ref, 1)):.3f} / {paired:.3f} "
                    f"/ {med(rates(n, 2)) / med(rates(ref, 2)):.3f} |")
        lines.append(row)
    return lines


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=400, help="Photos to make (640x480). Default: %(default)s")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per part. Default: %(default)s")
    p.add_argument("--shard-size", type=int, default=50, help="shard-coco --shard-size for every variant. Default: %(default)s")
    p.add_argument("--micro", type=int, default=16, help="Loader micro-batch. Default: %(default)s")
    p.add_argument("--parts", default="shard,loader", help="shard, loader or both. Default: %(default)s")
    p.add_argument("--workdir", type=Path, help="Keep photos and outputs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="Also write every time here.")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from benchlib.photos import make_coco_like
    from vlm_dist.config import load_config

    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_start": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python tools/bench_data.py", *(sys.argv[1:] if argv is None else argv)])}
    log(f"{env['cpu']}, {env['cores']} cores, load average {env['load_start']}")
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    work = args.workdir or Path(tmp.name)
    t0 = time.perf_counter()
    photos = make_coco_like(work / "photos", args.photos, workers=2)
    env["mean_kib"] = photos["mean_kib"]
    log(f"{photos['n']} photos, {photos['mean_kib']:.0f} KiB mean, made in {time.perf_counter() - t0:.1f} s")
    result: dict = {"env": env}
    lines = [f"{env['command']}  |  {env['date']}  |  {env['cpu']}, {env['cores']} cores  |  "
             f"{photos['n']} photos 640x480, {photos['mean_kib']:.0f} KiB mean", ""]
    if "shard" in args.parts:
        times = interleave(shard_variants(photos, work / "out", args.shard_size), args.rounds, log)
        result["shard"] = times
        lines += table(times, "writer", ["tar", "tar + fsync"]) + [""]
    if "loader" in args.parts:
        from benchlib.loader_bench import make_photo_shards

        cfg = load_config("base", ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"])
        shards = make_photo_shards(work, args.photos, workers=2, shard_size=args.shard_size)["shards"]
        runs = interleave(loader_variants(cfg, photos, shards, args.micro), args.rounds, log)
        result["loader"] = runs
        lines += table(runs, "pipeline (1 thread)", ["naive PIL + torchvision"]) + [""]
    env["load_end"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - t0
    lines.append(f"load average {env['load_start'][0]:.2f} at start, {env['load_end'][0]:.2f} at end; {env['wall_s']:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
