"""Learning curve of a training run from its RUN/metrics.jsonl, as a PNG (needs matplotlib: pip install -e ".[plot]").

    python tools/plot_curve.py runs/demo/metrics.jsonl --out docs/demo_learning_curve.png

Left: the in-training generation eval (`train.generate_every`, split "val_generate"): caption exact match,
Q&A accuracy and Q&A accuracy per question type, greedy decoding on validation images. Middle: teacher-
forced validation token accuracy per head (split "val"). Right: training and validation loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """{split: [records in step order]}; a resumed run's repeated steps keep the last record."""
    by_split: dict[str, dict[int, dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{n}: not a JSON line ({err}); is this a vlm-dist metrics.jsonl?") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise SystemExit(f"{path}:{n}: a record without an integer \"step\"; is this a vlm-dist metrics.jsonl?")
        by_split.setdefault(rec.get("split", "train"), {})[rec["step"]] = rec
    return {s: [recs[k] for k in sorted(recs)] for s, recs in by_split.items()}


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(metrics: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    gen = metrics.get("val_generate", [])
    ax = axes[0]
    for key, label, style in [("caption_exact_match", "caption exact match", "-o"), ("qa_accuracy", "Q&A accuracy (all)", "-s")]:
        ax.plot(*series(gen, key), style, label=label, lw=2, ms=4)
    type_keys = sorted({k for r in gen for k in r if k.startswith("qa_accuracy_")})
    for key in type_keys:
        ax.plot(*series(gen, key), "--", label="Q&A " + key.removeprefix("qa_accuracy_").replace("_", " "), lw=1)
    ax.set(title="validation, greedy generation", xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1.02))
    if not gen:
        ax.text(0.5, 0.5, "no val_generate records\n(train.generate_every=0)", ha="center", transform=ax.transAxes)
    ax = axes[1]
    val = metrics.get("val", [])
    heads = sorted({k for r in val for k in r if k.startswith("token_acc_head")})
    for key in heads:
        k = int(key.removeprefix("token_acc_head"))
        ax.plot(*series(val, key), "-o", ms=3, label=f"head {k} (token t+{k + 1})")
    ax.set(title="validation token accuracy (teacher forced)", xlabel="optimizer step", ylim=(0, 1.02))
    ax = axes[2]
    ax.plot(*series(metrics.get("train", []), "loss"), lw=1, label="train loss (all heads)")
    ax.plot(*series(val, "loss"), "-o", ms=3, label="val loss (all heads)")
    ax.set(title="loss", xlabel="optimizer step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", type=Path, help="RUN/metrics.jsonl of a training run")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None, help="figure title [the run directory]")
    args = p.parse_args(argv)
    if not args.metrics.is_file():
        raise SystemExit(f"{args.metrics} not found: pass RUN/metrics.jsonl of a training run")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('matplotlib is not installed: pip install -e ".[plot]"') from None
    plot(read_metrics(args.metrics), args.out, args.title or str(args.metrics.parent))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
