"""`vlm-dist demo-data`: a synthetic shapes set in the published COCO / VQA v2 formats (no download).

    vlm-dist demo-data --out data/demo --train 2000 --val 200 --seed 0
    vlm-dist shard-coco --images data/demo/images/train2017 --ann data/demo/annotations/captions_train2017.json \\
        --vqa-questions data/demo/annotations/v2_OpenEnded_mscoco_train2017_questions.json \\
        --vqa-annotations data/demo/annotations/v2_mscoco_train2017_annotations.json --out data/demo/shards/train

Each image shows one shape (left, center or right) or two (left and right), each with a kind
(circle / square / triangle), colour (red / green / blue / yellow) and size (small / large), on a
light background with a few pixels of jitter. Each image has ONE canonical caption from a fixed
template ("a small red circle on the left and a large blue square on the right"), so exact match
against the reference is meaningful, and unambiguous questions with one-word answers:
"how many shapes are there?" -> "2"; "what shape is on the left?" -> "circle";
"what colour is the square?" -> "blue" (or "... the shape on the right?" when both shapes share a
kind); "what size is the circle?" -> "small". Everything is a function of --seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 195, 30)}
# Half-width as a fraction of the side; with centers at 0.25 / 0.75 two large shapes stay >= 0.1 side
# apart (minus 2 px jitter each), so left and right never touch.
SIZES = {"small": 0.13, "large": 0.2}
X_OF = {"left": 0.25, "center": 0.5, "right": 0.75}
PLACE = {"left": "on the left", "center": "in the center", "right": "on the right"}
NUMBER = {1: "1", 2: "2"}  # VQA v2 stores counts as digits (its evaluation maps "two" to "2", never back)
VAL_ID_OFFSET = 1_000_000  # val image ids never collide with train ids


def make_scene(rng: random.Random) -> list[dict]:
    """One or two shapes: [{kind, colour, size, position}], left before right."""
    positions = [rng.choice(list(X_OF))] if rng.random() < 0.5 else ["left", "right"]
    return [{"kind": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": rng.choice(list(SIZES)),
             "position": p} for p in positions]


def caption(scene: list[dict]) -> str:
    return " and ".join(f"a {s['size']} {s['colour']} {s['kind']} {PLACE[s['position']]}" for s in scene)


def questions(scene: list[dict]) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs, each answerable from the image alone."""
    qa = [("how many shapes are there?", NUMBER[len(scene)])]
    kinds = [s["kind"] for s in scene]
    for s in scene:
        where = PLACE[s["position"]]
        qa.append((f"what shape is {where}?", s["kind"]))
        # Name the shape by kind only when that is unambiguous in this image.
        subject = f"the {s['kind']}" if kinds.count(s["kind"]) == 1 else f"the shape {where}"
        qa.append((f"what colour is {subject}?", s["colour"]))
        qa.append((f"what size is {subject}?", s["size"]))
    return qa


def render(scene: list[dict], rng: random.Random, side: int) -> Image.Image:
    bg = tuple(235 + rng.randrange(16) for _ in range(3))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for s in scene:
        cx = X_OF[s["position"]] * side + rng.uniform(-2, 2)
        cy = side / 2 + rng.uniform(-3, 3)
        r = SIZES[s["size"]] * side + rng.uniform(-1, 1)
        colour = tuple(min(255, max(0, c + rng.randrange(-12, 13))) for c in COLOURS[s["colour"]])
        box = [cx - r, cy - r, cx + r, cy + r]
        if s["kind"] == "circle":
            draw.ellipse(box, fill=colour)
        elif s["kind"] == "square":
            # The circle's bounding box: a square drawn smaller (0.85 r, as before) differed from a circle of
            # the same size by under 2 px at the 32 px a tower saw, and the demo model never told them apart.
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    return img


def write_split(out: Path, split: str, n: int, first_id: int, rng: random.Random, side: int) -> dict:
    """Images under images/{split}2017/, COCO captions + VQA v2 files under annotations/."""
    img_dir, ann_dir = out / "images" / f"{split}2017", out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, caps, qs, answers = [], [], [], []
    for i in range(n):
        image_id = first_id + i
        scene = make_scene(rng)
        name = f"{image_id:012d}.jpg"
        render(scene, rng, side).save(img_dir / name, "JPEG", quality=90, subsampling=0)  # 4:4:4: crisp colour edges
        images.append({"id": image_id, "file_name": name, "width": side, "height": side, "license": 0,
                       "coco_url": "", "flickr_url": "", "date_captured": "2024-01-01 00:00:00"})
        caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": caption(scene)})
        for j, (q, a) in enumerate(questions(scene)):
            qid = image_id * 100 + j  # VQA v2 numbers questions image_id * 1000 + j; 100 keeps ids small
            qs.append({"image_id": image_id, "question": q, "question_id": qid})
            answers.append({"question_id": qid, "image_id": image_id, "question_type": " ".join(q.split()[:2]),
                            "answer_type": "number" if q.startswith("how many") else "other",
                            "multiple_choice_answer": a,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]})
    info = {"description": "vlm-dist synthetic shapes (demo-data)", "version": "1.0", "year": 2024}
    files = {
        "captions": ann_dir / f"captions_{split}2017.json",
        "vqa_questions": ann_dir / f"v2_OpenEnded_mscoco_{split}2017_questions.json",
        "vqa_annotations": ann_dir / f"v2_mscoco_{split}2017_annotations.json",
    }
    _dump(files["captions"], {"info": info, "licenses": [{"id": 0, "name": "CC0", "url": ""}], "images": images,
                              "annotations": caps})
    _dump(files["vqa_questions"], {"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                   "data_subtype": f"{split}2017", "questions": qs})
    _dump(files["vqa_annotations"], {"info": info, "data_type": "mscoco", "data_subtype": f"{split}2017",
                                     "annotations": answers})
    return {"images": img_dir, **files, "n_images": n, "n_questions": len(qs)}


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def make_demo_data(out: Path, n_train: int = 2000, n_val: int = 200, seed: int = 0, side: int = 64) -> dict:
    """Write the train and val splits; return {split: paths and counts} (what shard-coco needs)."""
    if n_train < 1 or n_val < 0 or side < 32:
        raise ValueError("demo-data needs --train >= 1, --val >= 0 and --image-size >= 32")
    out = Path(out)
    splits = {"train": write_split(out, "train", n_train, 1, random.Random(f"demo/{seed}/train"), side)}
    if n_val:
        splits["val"] = write_split(out, "val", n_val, VAL_ID_OFFSET + 1, random.Random(f"demo/{seed}/val"), side)
    return splits


def shard_command(out: Path, split: str, paths: dict) -> str:
    return (f"vlm-dist shard-coco --images {paths['images']} --ann {paths['captions']} "
            f"--vqa-questions {paths['vqa_questions']} --vqa-annotations {paths['vqa_annotations']} "
            f"--out {Path(out) / 'shards' / split} --split {split}")
