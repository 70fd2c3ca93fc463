"""CPU data throughput: `vlm-dist shard-coco` vs `tar cf`, and the loader vs a naive PIL + torchvision pipeline.

    python tools/bench_data.py                      # 400 photos, 3 interleaved rounds (~2-3 min on 2 cores)
    python tools/bench_data.py --photos 64 --rounds 1 --json data.json      # quick
    git archive d4f4af1 | tar x -C /tmp/before         # an older tree, run side by side as "(before)":
    python tools/bench_data.py --before /tmp/before

Inputs: --photos COCO-sized photo-like JPEGs (640x480, ~130 KiB each, tools/benchlib/photos.py) and
a COCO captions file for them (2 captions per image), made once in --workdir and read from the page
cache by every variant alike.

1. Writing shards, images/s (wall time of the command, interpreter start-up included, each into a
   freshly emptied folder; all variants use --shard-size 50 so that --workers 2 has shards to share):
     tar            `tar cf OUT.tar -C PHOTOS images`                     (the I/O floor, no fsync)
     tar + fsync    the same followed by `sync OUT.tar`      (shard-coco fsyncs every shard it writes)
     shard-coco     `python -m vlm_dist.cli shard-coco --images ... --ann ... --out ... --no-progress`
                    (--verify header, the default: PIL header + JPEG marker structure; hashes each image,
                    writes .jpg/.json/.txt members, fsyncs each shard; bytes kept as they are)
     --verify full (also decodes each JPEG at 1/8 scale), --workers 2, and --resize 256 (decode at
     reduced size via JPEG draft, resize, re-encode); with --before DIR, also shard-coco run from DIR.
   "in-command" time: the summary.json's elapsed_s (the shard_coco call: annotations read, images
   checked, tars and manifest written and fsync'ed), i.e. without the interpreter's start-up and
   imports (~0.15-0.3 s, which a COCO-sized run of minutes amortises). For tar it is the wall time.
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
     with --before DIR: ImageToTensor and the loader with 0 workers from DIR, each in a subprocess
                    that times itself (its interpreter start-up and imports excluded)
   Interleaved rounds, medians; ratios over naive (target >= 2x). "steady": the loader's rate from its
   first batch to its last (without the per-epoch start-up: workers, shuffle buffer), which a COCO
   epoch of 118k images amortises; for naive and ImageToTensor it is the wall time.
     loader, 0 workers, --resize 224 shards   the loader on shards written with `shard-coco --resize 224`
                    (the COCO recipe's, launch/coco_base.sh): smaller JPEGs, decoded whole, then cropped
     loader, 0 / 1 worker(s), feature shards   the loader on `precompute-features` shards of the same photos
                    (the base tower's 49 x 768 tokens in bf16, random frozen weights): no decoding at all
3. --parts damage: how many damaged copies of the photos each --verify level rejects (benchlib/damage.py).
4. --parts pixels: how far each image path's tensors are from the naive one's (benchlib/pixels.py).
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


def measured(fn, images: int | None = None) -> tuple:
    """(images, wall seconds, CPU seconds) of fn(); fn returns the image count or None (= images)."""
    t, c = time.perf_counter(), cpu_now()
    got = fn()
    return (got if got is not None else images), time.perf_counter() - t, cpu_now() - c


def run_cmd(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


# --- 1. shard writing ------------------------------------------------------------------------------

def shard_variants(photos: dict, out: Path, shard_size: int, before: Path | None) -> dict:
    """name -> callable running it once into an emptied folder; returns (images, wall s, CPU s, in-command s)."""
    def env_for(root: Path) -> dict:
        return {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}

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
            n, wall, cpu = measured(lambda: run_cmd(cmd), photos["n"])
            return n, wall, cpu, wall
        return run

    def shard(*extra: str, root: Path = REPO):
        def run():
            out_dir = fresh()
            n, wall, cpu = measured(lambda: run_cmd(
                [sys.executable, "-m", "vlm_dist.cli", "shard-coco", "--images", str(photos["images"]), "--ann",
                 str(photos["ann"]), "--out", str(out_dir), "--no-progress", "--shard-size", str(shard_size), *extra],
                env=env_for(root), cwd=root), photos["n"])  # cwd: `python -m` imports from it first
            summary = json.loads((out_dir / "summary.json").read_text())
            assert summary["samples"] == photos["n"], summary
            return n, wall, cpu, summary["elapsed_s"]
        return run

    variants = {"tar": tar(False), "tar + fsync": tar(True)}
    if before is not None:
        variants["shard-coco (before)"] = shard(root=before)
    variants.update({"shard-coco": shard(), "shard-coco --verify full": shard("--verify", "full"),
                     "shard-coco --workers 2": shard("--workers", "2"), "shard-coco --resize 256": shard("--resize", "256")})
    return variants


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

BEFORE_CODE = """
import json, resource, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
what, files, shards, micro = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
from vlm_dist.config import load_config
cfg = load_config("base", ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"])
if what == "itt":
    from vlm_dist.data.samples import ImageToTensor
    to_tensor = ImageToTensor(cfg.model.vision.geometry["image_size"])
    raws = [Path(f) for f in files]
    t, c = time.perf_counter(), cpu()
    for f in raws:
        x = to_tensor(f.read_bytes())
    n = len(raws)
else:
    from benchlib.loader_bench import loader_throughput
    t, c = time.perf_counter(), cpu()
    row = loader_throughput(cfg, shards, 0, micro)
    n = row["images"]
print(json.dumps([n, time.perf_counter() - t, cpu() - c] + ([n / row["steady_images_s"]] if what != "itt" else [None])))
"""


def steady_seconds(row: dict, images: int) -> float:
    """The loader's steady rate (first batch to last: without worker start-up and the shuffle buffer's
    fill) as the seconds it would take for all `images` at that rate."""
    return images / row["steady_images_s"]


def before_variant(before: Path, what: str, files: list, shards: Path, micro: int):
    """Run the older tree's image path ("itt") or loader ("loader") in a subprocess timing itself."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(before), str(before / "tools")])}

    def run():
        proc = subprocess.run([sys.executable, "-c", BEFORE_CODE, what, json.dumps([str(f) for f in files]),
                               str(shards), str(micro)], capture_output=True, text=True, env=env, cwd=before)
        if proc.returncode != 0:
            raise RuntimeError(f"before ({what}) failed:\n{proc.stderr[-2000:]}")
        return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))
    return run


def loader_variants(cfg, photos: dict, shards: Path, micro: int, before: Path | None = None,
                    shards224: Path | None = None, features: Path | None = None) -> dict:
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

    def loader(workers: int, where: Path = shards):
        def run():
            rows: list[dict] = []
            n, wall, cpu = measured(lambda: rows.append(loader_throughput(cfg, where, workers, micro)) or rows[0]["images"])
            return n, wall, cpu, steady_seconds(rows[0], n)
        return run

    torch.set_num_threads(1)
    variants = {name: (lambda fn=fn: (*measured(fn), None)) for name, fn in
                {"naive PIL + torchvision": naive, "ImageToTensor (draft decode)": itt}.items()}
    variants.update({"loader, 0 workers": loader(0), "loader, 1 worker": loader(1)})
    if shards224 is not None:
        variants["loader, 0 workers, --resize 224 shards"] = loader(0, shards224)
    if features is not None:
        variants["loader, 0 workers, feature shards"] = loader(0, features)
        variants["loader, 1 worker, feature shards"] = loader(1, features)
    if before is not None:
        variants["ImageToTensor (before)"] = before_variant(before, "itt", files, shards, micro)
        variants["loader, 0 workers (before)"] = before_variant(before, "loader", files, shards, micro)
    return variants


def table(runs: dict[str, list[tuple]], what: str, refs: list[str], alt: str = "in-command") -> list[str]:
    """Medians of images/s by wall time and by CPU time, and the ratios to each reference variant:
    of the medians, and paired (median over rounds of the ratio within the round)."""
    def rates(name: str, k: int) -> list[float]:
        return [r[0] / r[k] for r in runs[name]]

    med = lambda xs: statistics.median(xs)  # noqa: E731
    runs = {n: [(*r[:3], r[3] if len(r) > 3 and r[3] is not None else r[1]) for r in v] for n, v in runs.items()}
    head = f"| {what} | wall s: median (min..max) | images/s (wall) | images/CPU-s |"
    head += f" {alt} s | images/s ({alt}) |"
    for ref in refs:
        head += f" vs {ref}: wall / paired wall / CPU / {alt} |"
    lines = [head, "|" + "---|" * (6 + len(refs))]
    for n in runs:
        wall = [r[1] for r in runs[n]]
        row = (f"| {n} | {med(wall):.3f} ({min(wall):.3f}..{max(wall):.3f}) | {med(rates(n, 1)):.0f} "
               f"| {med(rates(n, 2)):.0f} |")
        row += f" {med([r[3] for r in runs[n]]):.3f} | {med(rates(n, 3)):.0f} |"
        for ref in refs:
            paired = med([a / b for a, b in zip(rates(n, 1), rates(ref, 1))])
            row += (f" {med(rates(n, 1)) / med(rates(ref, 1)):.3f} / {paired:.3f} "
                    f"/ {med(rates(n, 2)) / med(rates(ref, 2)):.3f}")
            row += f" / {med(rates(n, 3)) / med(rates(ref, 3)):.3f} |"
        lines.append(row)
    return lines


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=400, help="Photos to make (640x480). Default: %(default)s")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per part. Default: %(default)s")
    p.add_argument("--shard-size", type=int, default=50, help="shard-coco --shard-size for every variant. Default: %(default)s")
    p.add_argument("--micro", type=int, default=16, help="Loader micro-batch. Default: %(default)s")
    p.add_argument("--parts", default="shard,loader,damage,pixels", help="shard, loader, damage, pixels (comma-separated). "
                   "Default: %(default)s")
    p.add_argument("--before", type=Path, help="A source tree of older code (git archive COMMIT | tar x -C DIR): "
                   "its shard-coco, ImageToTensor and loader run side by side, marked (before).")
    p.add_argument("--damage-copies", type=int, default=100, help="Photos damaged per kind (--parts damage). "
                   "Default: %(default)s")
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
        times = interleave(shard_variants(photos, work / "out", args.shard_size, args.before), args.rounds, log)
        result["shard"] = times
        lines += table(times, "writer", ["tar", "tar + fsync"]) + [""]
    if "loader" in args.parts:
        from benchlib.loader_bench import make_photo_shards

        cfg = load_config("base", ["model.vision.pretrained=null", "model.vision.allow_random_frozen=true"])
        from vlm_dist.data.shard import shard_coco

        shards = make_photo_shards(work, args.photos, workers=2, shard_size=args.shard_size)["shards"]
        shards224 = work / "shards224"
        shard_coco(photos["images"], [photos["ann"]], shards224, shard_size=args.shard_size, resize=224, workers=2,
                   progress=False, log=lambda m: None)
        from vlm_dist.data.features import precompute_features

        t = time.perf_counter()  # the base tower (ViT-B-32, random weights) on this CPU, its output stored in bf16
        made = precompute_features(str(shards), work / "features", cfg, batch_size=32, workers=2, dtype="bf16",
                                   device="cpu", progress=False)
        made_s = time.perf_counter() - t
        runs = interleave(loader_variants(cfg, photos, shards, args.micro, args.before, shards224, work / "features"),
                          args.rounds, log)
        result["loader"] = runs
        result["precompute"] = {**made, "wall_s": made_s}
        lines += table(runs, "pipeline (1 thread)", ["naive PIL + torchvision"], alt="steady") + [""]
        lines += [f"feature shards: `precompute_features` (ViT-B-32, random frozen weights, bf16, 2 decoding processes, "
                  f"this CPU) {made['samples']} images in {made_s:.1f} s ({made['samples'] / made_s:.1f} images/s), "
                  f"{made['bytes'] / made['samples'] / 1024:.1f} KiB per sample (the JPEG shards: "
                  f"{sum(f.stat().st_size for f in shards.glob('*.tar')) / made['samples'] / 1024:.1f} KiB, "
                  f"--resize 224: {sum(f.stat().st_size for f in shards224.glob('*.tar')) / made['samples'] / 1024:.1f} "
                  f"KiB; tar members and JSON included)", ""]
    if "damage" in args.parts:
        from benchlib.damage import damage_table

        damage_lines, result["damage"] = damage_table(photos["files"], args.damage_copies)
        lines += damage_lines + [""]
    if "pixels" in args.parts:
        from benchlib.pixels import pixel_table

        pixel_lines, result["pixels"] = pixel_table(photos["files"][:100], 224)
        lines += pixel_lines + [""]
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
