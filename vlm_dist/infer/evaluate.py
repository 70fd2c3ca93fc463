"""What the model learned: generate a caption for every validation image and an answer for every
question, and score them (exact match, Q&A accuracy; BLEU/ROUGE-L/CIDEr with pycocoevalcap, METEOR where Java exists).

    vlm-dist eval --model exports/demo --shards data/demo/shards/val --out runs/demo/eval.json

Validation shards are read directly (every caption and every question of every image, not the
training loader's one-per-image choice); like the loader, only .jpg/.json/.txt members are read.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from vlm_dist.text import get_tokenizer, prompt_tokens


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: 'A red circle .' == 'a red circle'."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def iter_shard_samples(shards: str, limit: int | None = None) -> Iterator[tuple[str, bytes, dict]]:
    """(key, jpg bytes, metadata) of each image in the shards, in manifest order."""
    import webdataset as wds

    from vlm_dist.data.manifest import resolve_shards
    from vlm_dist.data.samples import wanted_member

    n = 0
    for shard in resolve_shards(shards):
        for raw in wds.tarfile_samples([{"url": shard.url}], select_files=wanted_member):
            if limit is not None and n >= limit:
                return
            yield raw["__key__"], raw["jpg"], json.loads(raw["json"])
            n += 1


def _tasks(shards: str, limit: int | None) -> list[dict]:
    tasks = []
    for key, jpg, meta in iter_shard_samples(shards, limit):
        image_id = int(meta.get("image_id", -1))
        if meta.get("captions"):
            tasks.append({"key": key, "jpg": jpg, "image_id": image_id, "question": None, "refs": meta["captions"]})
        for qa in meta.get("qa") or []:
            tasks.append({"key": key, "jpg": jpg, "image_id": image_id, "question": qa["question"],
                          "refs": [qa["answer"]]})
    if not tasks:
        raise ValueError(f"no captions or questions found in {shards}")
    return tasks


def coco_caption_scores(predictions: dict[int, str], references: dict[int, list[str]],
                        meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr with pycocoevalcap; METEOR too where Java is installed (its jar
    ships with pycocoevalcap). SPICE is never run: it downloads Stanford CoreNLP models on first use."""
    import shutil

    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return {}
    # pycocoevalcap's PTB tokenizer is a Java program too; normalise() is the (Java-free) tokenisation.
    res = {i: [normalise(c)] for i, c in predictions.items()}
    gts = {i: [normalise(r) for r in references[i]] for i in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    return scores


@torch.no_grad()
def evaluate_generation(model, shards: str, limit: int | None = None, batch_size: int = 32,
                        max_new_tokens: int = 24, progress: bool = True, meteor: bool = True,
                        speculative: bool = False) -> dict:
    """Greedy captions and answers for the shards; returns metrics and per-task predictions.
    speculative=True decodes with the multi-token heads drafting (same output) and adds its stats."""
    from tqdm import tqdm

    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.generate import fit_max_new_tokens, generate

    tok = get_tokenizer()
    to_tensor = ImageToTensor(model.cfg.vision.geometry["image_size"])
    tasks = _tasks(shards, limit)
    longest = max(len(prompt_tokens(tok, t["question"])) for t in tasks)  # every batch's prompts fit
    max_new, note = fit_max_new_tokens(model.cfg, longest, max_new_tokens, speculative)
    if note and progress:
        print(note, file=sys.stderr)
    t0, n_tokens, spec = time.perf_counter(), 0, []
    for i in tqdm(range(0, len(tasks), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk = tasks[i : i + batch_size]
        images = torch.stack([to_tensor(t["jpg"]) for t in chunk])
        prompts = [prompt_tokens(tok, t["question"]) for t in chunk]
        if speculative:
            from vlm_dist.infer.speculative import speculative_generate_batch

            outs, stats = speculative_generate_batch(model, images, prompts, max_new_tokens=max_new)
            spec.append(stats)
        else:
            outs = generate(model, images, prompts, max_new_tokens=max_new)
        for t, ids in zip(chunk, outs):
            t["prediction"] = tok.decode(ids)
            n_tokens += len(ids) + 1  # + the end token (or the cut)
    seconds = time.perf_counter() - t0
    caps = [t for t in tasks if t["question"] is None]
    qas = [t for t in tasks if t["question"] is not None]
    hit = lambda t: normalise(t["prediction"]) in {normalise(r) for r in t["refs"]}  # noqa: E731
    metrics = {"images": len({t["key"] for t in tasks}), "captions": len(caps), "questions": len(qas),
               "caption_exact_match": sum(map(hit, caps)) / max(len(caps), 1),
               "qa_accuracy": sum(map(hit, qas)) / max(len(qas), 1),
               "decode_tokens_per_s": n_tokens / seconds}
    if spec:
        from vlm_dist.infer.speculative import merge_stats

        metrics["speculative"] = merge_stats(spec)
    if caps:
        metrics.update(coco_caption_scores({t["image_id"]: t["prediction"] for t in caps},
                                           {t["image_id"]: t["refs"] for t in caps}, meteor))
    predictions = [{k: t[k] for k in ("image_id", "question", "prediction", "refs")} for t in tasks]
    return {"metrics": metrics, "predictions": predictions}


def write_results(result: dict, out: str | Path) -> None:
    """metrics + predictions to OUT; captions in COCO results format to OUT's *_captions.json sibling."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    coco = [{"image_id": p["image_id"], "caption": p["prediction"]} for p in result["predictions"] if p["question"] is None]
    out.with_name(out.stem + "_captions.json").write_text(json.dumps(coco))


def format_metrics(m: dict) -> str:
    lines = [f"{m['images']} images: caption exact match {m['caption_exact_match']:.1%} ({m['captions']} captions), "
             f"Q&A accuracy {m['qa_accuracy']:.1%} ({m['questions']} questions)"]
    scores = [f"{k} {m[k]:.3f}" for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in m]
    if scores:
        not_run = "SPICE" if "METEOR" in m else "METEOR (no Java) and SPICE"
        lines.append(f"caption metrics (pycocoevalcap; {not_run} not run): " + ", ".join(scores))
    lines.append(f"{'speculative' if 'speculative' in m else 'greedy'} decoding: {m['decode_tokens_per_s']:.0f} tokens/s")
    if "speculative" in m:
        from vlm_dist.infer.speculative import format_stats

        lines.append(format_stats(m["speculative"]))
    return "\n".join(lines)
