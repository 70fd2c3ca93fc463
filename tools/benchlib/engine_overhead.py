"""Engine overhead for tools/bench_engine.py (--parts overhead): plain PyTorch vs DeepSpeed ZeRO-0 / ZeRO-2.

1. Overhead (one process, world of one). Three models with the same state dict: plain PyTorch
   (zero_grad(set_to_none) -> loss.backward() -> AdamW.step(), weight-decay groups from
   vlm_dist.train.engine.param_groups) and DeepSpeed engines at ZeRO stage 0 and stage 2
   (engine(batch) -> engine.backward(loss) -> engine.step()). Precision fp32 on both sides by
   default: plain bf16 would be autocast over fp32 weights, while engine bf16 casts the module and
   keeps fp32 master weights in the optimizer wrapper, i.e. a different algorithm whose time
   difference is not engine overhead. (--precision bf16 times exactly that pair, for GPUs.)
   After --warmup untimed steps each, the variants are stepped in turn, the order rotating each
   round (A B C, B C A, ...), so drift in the machine's load hits all alike. Reported: median
   (min..max) step time; the ratio engine/plain of medians, of minima, and "paired" (median over
   rounds of engine step / plain step in the same round); the median process CPU time per step
   (less sensitive to other jobs on a shared CPU) and its ratio; and the largest loss
   difference to plain over all steps (fp32 stage 0 must track plain to float round-off: same algorithm).
"""

from __future__ import annotations

import statistics
import time

from benchlib.engine_common import build_model, ds_config


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(preset: str, batch: int, precision: str, device):
    """name -> step() returning (seconds, loss); all from one state dict, stepping one batch."""
    import torch
    from bench_model import make_batch
    from vlm_dist.train.engine import build_engine, param_groups

    cfg, ref = build_model(preset, None, device)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    images, ids, targets = make_batch(cfg, batch, ref.vocab_size, device)
    opt_params = ds_config(0, precision, batch)["optimizer"]["params"]
    hyper = {k: opt_params[k] for k in ("lr", "betas", "eps")}

    def plain():
        _, model = build_model(preset, state, device)
        opt = torch.optim.AdamW(param_groups(model, opt_params["weight_decay"]), **hyper)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = model(images, ids, targets)["loss"]
            loss.backward()
            opt.step()
            return loss
        return step

    def engine(stage: int):
        _, model = build_model(preset, state, device)
        eng = build_engine(model, ds_config(stage, precision, batch))
        img = images.to(torch.bfloat16 if precision == "bf16" else torch.float32)  # the engine casts the module only

        def step():
            loss = eng(img, ids, targets)["loss"]
            eng.backward(loss)
            eng.step()
            return loss
        return step, eng

    s0, e0 = engine(0)
    s2, e2 = engine(2)
    kinds = {"plain": "torch.optim.AdamW", "ds0": type(e0.optimizer).__name__, "ds2": type(e2.optimizer).__name__}
    n_params = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
    return {"plain": plain(), "ds0": s0, "ds2": s2}, kinds, n_params, cfg


def timed(step, device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss). CPU time is less sensitive to other jobs on a shared CPU."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def bench_overhead(preset: str, batch: int, precision: str, repeats: int, warmup: int, device) -> dict:
    variants, kinds, n_params, cfg = make_variants(preset, batch, precision, device)
    names = list(variants)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    losses = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            losses[n].append(timed(variants[n], device)[2])
    for r in range(repeats):
        for n in names[r % 3:] + names[:r % 3]:  # rotate the order each round
            t, c, loss = timed(variants[n], device)
            times[n].append(t)
            cpu[n].append(c)
            losses[n].append(loss)
    out = {"preset": preset, "batch": batch, "precision": precision, "repeats": repeats, "warmup": warmup,
           "params": n_params, "optimizers": kinds, "threads": __import__("torch").get_num_threads(), "variants": {}}
    for n in names:
        d = max(abs(a - b) for a, b in zip(losses[n], losses["plain"]))
        out["variants"][n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]),
                              "max_s": max(times[n]), "times_s": times[n], "cpu_s": cpu[n],
                              "cpu_median_s": statistics.median(cpu[n]), "losses": losses[n], "max_dloss": d,
                              # per round, this variant's step / plain's step of the same round (drift cancels)
                              "paired_ratio": statistics.median(a / b for a, b in zip(times[n], times["plain"]))}
    return out



def _spread(v: dict) -> str:
    return f"{v['median_s']:.3f} ({v['min_s']:.3f}..{v['max_s']:.3f})"


def render_overhead(rows: list[dict]) -> list[str]:
    lines = ["### DeepSpeed engine vs plain PyTorch: training step, seconds, 1 rank, interleaved", "",
             "| preset | batch | params | precision | steps each | plain AdamW: median (min..max) "
             "| ZeRO-0 engine | ZeRO-2 engine | ZeRO-0/plain: medians / mins / paired | ZeRO-2/plain: medians / mins / paired "
             "| CPU s/step, median: plain / ZeRO-0 / ZeRO-2 | CPU-time ratio ZeRO-0 / ZeRO-2 "
             "| max abs loss diff to plain (0 / 2) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variants"]
        ratio = lambda n: (f"{v[n]['median_s'] / v['plain']['median_s']:.3f} / {v[n]['min_s'] / v['plain']['min_s']:.3f}"  # noqa: E731
                           f" / {v[n]['paired_ratio']:.3f}")
        c = {n: v[n]["cpu_median_s"] for n in v}
        lines.append(f"| {r['preset']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['precision']} | {r['repeats']} "
                     f"| {_spread(v['plain'])} | {_spread(v['ds0'])} | {_spread(v['ds2'])} | {ratio('ds0')} "
                     f"| {ratio('ds2')} | {c['plain']:.2f} / {c['ds0']:.2f} / {c['ds2']:.2f} "
                     f"| {c['ds0'] / c['plain']:.3f} / {c['ds2'] / c['plain']:.3f} "
                     f"| {v['ds0']['max_dloss']:.1e} / {v['ds2']['max_dloss']:.1e} |")
    return lines

