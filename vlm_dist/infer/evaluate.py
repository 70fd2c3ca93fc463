"""What the model learned: generate a caption for every validation image and an answer for every
question, and score them with the field's metrics (vlm_dist/infer/metrics.py): caption exact match and
COCO caption scores (pycocoevalcap's own pipeline where Java exists), Q&A exact match and the official
VQA v2 accuracy, overall and per question type.

    vlm-dist eval --model runs/demo/export --shards data/demo/shards/val --out runs/demo/eval.json \\
        --batch-size 32 --max-new-tokens 24

Validation shards are read directly (every caption and every question of every image, not the
training loader's one-per-image choice); like the loader, only .jpg/.safetensors/.json/.txt members are read.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path
from typing import Iterator

import torch

from vlm_dist.infer.metrics import caption_scores, scores_note, vqa_accuracy, write_caption_files
from vlm_dist.text import get_tokenizer, prompt_tokens


class EvalDataError(ValueError):
    """The evaluation shards lack something scoring needs; the message names the sample and the fix."""


def normalise(text: str) -> str:
    """Exact-match normalisation: lower case, punctuation dropped, single spaces ('A red circle .' == 'a red circle')."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def iter_shard_samples(shards: str, limit: int | None = None, vision=None) -> Iterator[tuple[str, bytes | torch.Tensor, dict]]:
    """(key, image, metadata) of each image in the shards, in manifest order. image: the .jpg bytes, or in
    feature shards (data/features.py, as their manifest says) the frozen tower's (P, W) tokens, which
    `vision` (the model's VisionConfig), when given, must be able to take (data.features.check_features)."""
    import webdataset as wds

    from vlm_dist.data.features import EXT, check_features, decode, features_record
    from vlm_dist.data.manifest import resolve_shards
    from vlm_dist.data.samples import wanted_member

    found = resolve_shards(shards)
    record = features_record(found)
    if vision is not None:
        # the tower's name, activation, image size and freeze, not its weights' SHA-256 (the trainer's check at
        # start-up): here the weights may be bf16, as a bf16 engine or export holds them
        check_features(record, vision)
    member = EXT if record is not None else "jpg"  # what every sample must hold
    n = 0
    for shard in found:
        samples = wds.tarfile_samples([{"url": shard.url}], select_files=wanted_member)
        while True:
            if limit is not None and n >= limit:
                return
            try:
                raw = next(samples, None)
            except (tarfile.TarError, OSError) as err:  # cut short or overwritten
                raise EvalDataError(f"{shard.url} is damaged after {n} samples ({type(err).__name__}: {err}): write it "
                                    f"again with `vlm-dist shard-coco`") from err
            if raw is None:
                break
            if "json" not in raw or member not in raw:
                raise EvalDataError(
                    f"sample {raw['__key__']} of {shard.url} has no {'.json' if 'json' not in raw else '.' + member}: "
                    f"evaluation needs each image's image_id, captions and Q&A, as `vlm-dist shard-coco` writes them "
                    f"(img2dataset shards train, but cannot be scored), and the image its manifest promises (.jpg, "
                    f"or with a features record .{EXT})")
            try:
                meta = json.loads(raw["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise EvalDataError(f"sample {raw['__key__']} of {shard.url}: its .json is not valid JSON ({err}): "
                                    f"write the shard again with `vlm-dist shard-coco`") from err
            image = decode(raw[EXT], raw["__key__"], shard.url) if member == EXT else raw["jpg"]
            yield raw["__key__"], image, meta
            n += 1


def _pixels(task: dict, to_tensor) -> torch.Tensor:
    """A task's model input: its tower tokens as they are, or its JPEG decoded."""
    if isinstance(task["image"], torch.Tensor):
        return task["image"]
    try:
        return to_tensor(task["image"])
    except Exception as err:  # PIL raises many types for a bad image
        raise _bad_image(task["key"], err) from err


def _bad_image(key: str, err: Exception) -> EvalDataError:
    """An image that does not decode is an error naming it: a score over the images that did would not be the
    shards' score."""
    why = f"{type(err).__name__}: {err}".replace("<_io.BytesIO object", "<the .jpg member")
    return EvalDataError(f"sample {key!r}: its image does not decode ({why}); evaluation scores every image: "
                         f"write the shard again with `vlm-dist shard-coco`, which checks each image")


def question_type(qa: dict) -> str:
    """The VQA question type stored with the question (VQA v2's `question_type`), else its first two words."""
    return qa.get("question_type") or " ".join(qa["question"].lower().split()[:2])


def _tasks(shards: str, limit: int | None, vision) -> list[dict]:
    from PIL import Image

    tasks = []
    for key, image, meta in iter_shard_samples(shards, limit, vision):
        if not isinstance(image, torch.Tensor):
            try:  # the header only (~20 us): an image that is none fails here, before any decoding
                Image.open(io.BytesIO(image))
            except Exception as err:  # PIL raises many types for a bad image
                raise _bad_image(key, err) from err
        image_id = meta.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise EvalDataError(f"sample {key!r} in {shards} has no integer image_id ({image_id!r}); COCO scoring "
                                f"needs one per image: write the shards with `vlm-dist shard-coco`")
        if meta.get("captions"):
            tasks.append({"key": key, "image": image, "image_id": image_id, "question": None, "refs": meta["captions"]})
        for qa in meta.get("qa") or []:
            tasks.append({"key": key, "image": image, "image_id": image_id, "question": qa["question"],
                          "refs": [qa["answer"]], "answers": list(qa.get("answers") or []), "type": question_type(qa)})
    if not tasks:
        raise EvalDataError(f"no captions or questions found in {shards}")
    return tasks


def _batches(tasks: list[dict], budgets: list[int], batch_size: int) -> Iterator[tuple[list[dict], int]]:
    """Batches of tasks sharing one token budget (a long question must not shorten the captions)."""
    order = sorted(range(len(tasks)), key=lambda i: budgets[i])  # stable: shard order within a budget
    i = 0
    while i < len(order):
        budget = budgets[order[i]]
        j = i
        while j < len(order) and j - i < batch_size and budgets[order[j]] == budget:
            j += 1
        yield [tasks[k] for k in order[i:j]], budget
        i = j


@torch.no_grad()
def evaluate_generation(model, shards: str, limit: int | None = None, batch_size: int = 32,
                        max_new_tokens: int = 24, progress: bool = True, meteor: bool = True,
                        java: bool | None = None, speculative: bool = False, static: bool | None = None) -> dict:
    """Greedy captions and answers for the shards; returns {"metrics", "predictions"}.
    speculative=True decodes with the multi-token heads drafting (same output) and adds its stats.
    static: fixed-shape decoding steps (CUDA graphs on a GPU, infer/static.py); None: on a GPU, not on a CPU.

    A question whose prompt leaves no room for an answer in model.max_seq_len is not generated: it
    is counted in `questions_too_long` and scored as wrong. java=None: official caption pipeline when
    Java is installed (see metrics.caption_scores); meteor=False skips METEOR (in-training evals).
    """
    from tqdm import tqdm

    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.generate import decoding, generate

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    tok = get_tokenizer()
    to_tensor = ImageToTensor(model.cfg.vision.geometry["image_size"])
    tasks = _tasks(shards, limit, model.cfg.vision)
    room = model.cfg.max_seq_len - model.n_image_tokens  # text positions: prompt + generated tokens
    prompts = [prompt_tokens(tok, t["question"]) for t in tasks]
    budgets = [min(max_new_tokens, room - len(p)) for p in prompts]
    for t, p, b in zip(tasks, prompts, budgets):
        t["prompt"], t["prediction"], t["too_long"] = p, "", b < 1
    todo = [(t, b) for t, b in zip(tasks, budgets) if b >= 1]
    t0, n_tokens, spec = time.perf_counter(), 0, []
    batches = list(_batches([t for t, _ in todo], [b for _, b in todo], batch_size))
    with decoding(model):  # once for all batches: a model in training rebuilds its caches once
        for chunk, budget in tqdm(batches, desc="eval", unit="batch", disable=not progress):
            images = torch.stack([_pixels(t, to_tensor) for t in chunk])
            if speculative:
                from vlm_dist.infer.speculative import speculative_generate_batch

                outs, stats = speculative_generate_batch(model, images, [t["prompt"] for t in chunk],
                                                         max_new_tokens=budget, static=static)
                spec.append(stats)
            else:
                outs = generate(model, images, [t["prompt"] for t in chunk], max_new_tokens=budget, static=static)
            for t, ids in zip(chunk, outs):
                t["prediction"] = tok.decode(ids)
                n_tokens += len(ids) + (len(ids) < budget)  # + the end token a row shorter than its budget decoded
    seconds = time.perf_counter() - t0
    metrics = score(tasks, meteor=meteor, java=java)
    metrics["decode_tokens_per_s"] = n_tokens / max(seconds, 1e-9)
    if spec:
        from vlm_dist.infer.speculative import merge_stats

        metrics["speculative"] = merge_stats(spec)
    keep = ("image_id", "question", "type", "prediction", "refs", "answers", "exact_match", "vqa_accuracy", "too_long")
    predictions = [{k: t[k] for k in keep if k in t} for t in tasks]
    return {"metrics": metrics, "predictions": predictions}


def score(tasks: list[dict], meteor: bool = True, java: bool | None = None) -> dict:
    """Metrics of tasks that carry a "prediction": exact match, VQA accuracy per question type, caption scores."""
    caps = [t for t in tasks if t["question"] is None]
    qas = [t for t in tasks if t["question"] is not None]
    for t in tasks:
        t["exact_match"] = float(not t.get("too_long") and normalise(t["prediction"]) in {normalise(r) for r in t["refs"]})
    for t in qas:
        answers = t["answers"] if len(t["answers"]) >= 2 else None  # VQA accuracy needs the annotators' answers
        t["vqa_accuracy"] = None if answers is None else 0.0 if t["too_long"] else vqa_accuracy(t["prediction"], answers)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    m: dict = {"images": len({t["key"] for t in tasks}), "captions": len(caps), "questions": len(qas),
               "questions_too_long": sum(t["too_long"] for t in qas),
               "caption_exact_match": mean([t["exact_match"] for t in caps]),
               "qa_accuracy": mean([t["exact_match"] for t in qas])}
    scored = [t["vqa_accuracy"] for t in qas if t["vqa_accuracy"] is not None]
    if scored:
        m["qa_vqa_accuracy"] = mean(scored)
        m["questions_without_annotator_answers"] = len(qas) - len(scored)
    by_type: dict[str, dict] = {}
    for t in qas:
        by_type.setdefault(t["type"], {"questions": 0, "exact": [], "vqa": []})
        entry = by_type[t["type"]]
        entry["questions"] += 1
        entry["exact"].append(t["exact_match"])
        if t["vqa_accuracy"] is not None:
            entry["vqa"].append(t["vqa_accuracy"])
    m["by_type"], slugs = {}, set()
    for name, entry in sorted(by_type.items()):
        slug = base = re.sub(r"\W+", "_", name).strip("_")
        n = 1
        while slug in slugs:  # "what color" and "what-color": two types, two keys (by_type holds the names)
            n += 1
            slug = f"{base}_{n}"
        slugs.add(slug)
        m[f"qa_accuracy_{slug}"] = mean(entry["exact"])
        m["by_type"][name] = {"questions": entry["questions"], "exact_match": mean(entry["exact"])}
        if entry["vqa"]:
            m[f"qa_vqa_accuracy_{slug}"] = m["by_type"][name]["vqa_accuracy"] = mean(entry["vqa"])
    if caps:
        scores = caption_scores(*caption_dicts(caps), java=java, meteor=meteor)
        m["caption_tokenizer"] = scores.pop("tokenizer")
        m.update(scores)
    return m


def caption_dicts(caps: list[dict]) -> tuple[dict[int, str], dict[int, list[str]]]:
    """({image_id: predicted caption}, {image_id: references}); one caption task per image."""
    preds, refs = {}, {}
    for t in caps:
        if t["image_id"] in preds:
            raise EvalDataError(f"image_id {t['image_id']} appears twice in the shards; COCO scoring needs one "
                                f"prediction per image (reshard so that each image is one sample)")
        preds[t["image_id"]], refs[t["image_id"]] = t["prediction"], t["refs"]
    return preds, refs


def write_results(result: dict, out: str | Path) -> dict[str, Path]:
    """metrics + predictions to OUT; the captions in COCO results format to OUT_captions.json and their
    references as a COCO captions file to OUT_captions_ref.json: COCO(ref).loadRes(results) loads them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    paths = {"results": out.with_name(out.stem + "_captions.json"), "references": out.with_name(out.stem + "_captions_ref.json")}
    caps = [p for p in result["predictions"] if p["question"] is None]
    if caps:
        write_caption_files(*caption_dicts(caps), paths["results"], paths["references"])
    return paths


def format_metrics(m: dict) -> str:
    lines = [f"{m['images']} images: caption exact match {m['caption_exact_match']:.1%} ({m['captions']} captions); "
             f"Q&A exact match {m['qa_accuracy']:.1%}" + (f", VQA accuracy {m['qa_vqa_accuracy']:.1%}" if "qa_vqa_accuracy" in m
                                                          else "") + f" ({m['questions']} questions)"]
    for name, e in m.get("by_type", {}).items():
        vqa = f", VQA accuracy {e['vqa_accuracy']:.1%}" if "vqa_accuracy" in e else ""
        lines.append(f"  {name!r:16} {e['questions']:5d} questions: exact match {e['exact_match']:.1%}{vqa}")
    if m.get("questions_too_long"):
        lines.append(f"{m['questions_too_long']} question(s) too long for model.max_seq_len: not generated, scored as wrong")
    if m.get("questions_without_annotator_answers"):
        lines.append(f"{m['questions_without_annotator_answers']} question(s) without annotator answers: no VQA accuracy")
    scores = [f"{k} {m[k]:.3f}" for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in m]
    if scores:
        lines.append("caption metrics: " + ", ".join(scores))
        lines.append("  (" + scores_note({"tokenizer": m.get("caption_tokenizer"), **({"METEOR": 1} if "METEOR" in m else {})}) + ")")
    lines.append(f"{'speculative' if 'speculative' in m else 'greedy'} decoding: {m['decode_tokens_per_s']:.0f} tokens/s")
    if "speculative" in m:
        from vlm_dist.infer.speculative import format_stats

        lines.append(format_stats(m["speculative"]))
    return "\n".join(lines)
