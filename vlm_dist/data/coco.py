"""Readers for the published COCO annotation formats, merged into one record per image.

    from vlm_dist.data.coco import read_annotations
    col = read_annotations([Path("captions_train2017.json")], vqa=None)

Formats (detected from the JSON's shape, not the file name):
  * official COCO captions (`captions_train2017.json`, `captions_val2014.json`):
    {"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}
  * Karpathy splits as used by LAVIS: a list of {"image": "train2014/COCO_...jpg", "caption": str or
    [str, ...], "image_id"?: int | "COCO_val2014_000000391895" | "coco_391895"}; a missing image_id is
    read from the digits at the end of the file name.
  * VQA v2: questions file {"questions": [{"image_id", "question", "question_id"}]} + annotations file
    {"annotations": [{"question_id", "multiple_choice_answer", "answers"}]}, joined on question_id.

Accounting: every caption and every question is an "annotation unit". Each unit ends up either on an
ImageRecord (to be written) or in `Collection.rejects` with a reason code; answers whose question_id
matches no question are units of their own (rejected as unknown_question_id). Image-level outcomes
(missing / unreadable image) are decided later, by the shard writer, for all units of that image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TRAILING_DIGITS = re.compile(r"(\d+)$")
_NAME_DIGITS = re.compile(r"(\d+)\.[A-Za-z]+$")


class AnnotationFileError(ValueError):
    """An annotation file cannot be used at all (missing, malformed JSON, unknown layout)."""


@dataclass
class ImageRecord:
    image_id: int
    file_names: list[str] = field(default_factory=list)  # as given by the annotation files, first = preferred
    captions: list[dict] = field(default_factory=list)  # {"caption", "source", "ann_id"}
    qa: list[dict] = field(default_factory=list)  # {"question_id", "question", "answer", "answers", ["question_type", "answer_type",] "source"}
    sources: list[str] = field(default_factory=list)

    def units(self) -> int:
        return len(self.captions) + len(self.qa)

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "file_names": self.file_names, "captions": self.captions,
                "qa": self.qa, "sources": self.sources}


@dataclass
class Collection:
    images: dict[int, ImageRecord] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)  # one clear line per unusable annotation file
    files_read: list[str] = field(default_factory=list)
    units_in: dict[str, int] = field(default_factory=lambda: {"caption": 0, "qa": 0})
    _caption_keys: set = field(default_factory=set)
    _ann_ids: set = field(default_factory=set)

    def image(self, image_id: int, file_name: str | None, source: str) -> ImageRecord:
        rec = self.images.get(image_id)
        if rec is None:
            rec = self.images[image_id] = ImageRecord(image_id)
        if file_name and file_name not in rec.file_names:
            rec.file_names.append(file_name)
        if source not in rec.sources:
            rec.sources.append(source)
        return rec

    def reject(self, kind: str, reason: str, source: str, detail: str = "", **ids: Any) -> None:
        self.rejects.append({"kind": kind, "reason": reason, "source": source, "detail": detail, **ids})

    def add_caption(self, image_id: int, file_name: str | None, caption: Any, source: str, ann_id: Any = None) -> None:
        """Count one caption unit and keep it or reject it (empty / duplicate)."""
        self.units_in["caption"] += 1
        ids = {"image_id": image_id, "ann_id": ann_id}
        if ann_id is not None:
            if (source, ann_id) in self._ann_ids:
                return self.reject("caption", "duplicate_annotation", source, f"annotation id {ann_id} repeated", **ids)
            self._ann_ids.add((source, ann_id))
        text = " ".join(caption.split()) if isinstance(caption, str) else ""
        if not text:
            return self.reject("caption", "empty_caption", source, f"caption {caption!r}", **ids)
        key = (image_id, text.lower())
        if key in self._caption_keys:
            return self.reject("caption", "duplicate_caption", source, f"{text!r} already given for this image", **ids)
        self._caption_keys.add(key)
        self.image(image_id, file_name, source).captions.append({"caption": text, "source": source, "ann_id": ann_id})


def load_json(path: Path) -> Any:
    """Parse one annotation file; raise AnnotationFileError naming the file, position and fix."""
    if not path.is_file():
        raise AnnotationFileError(f"{path}: annotation file not found; check the path")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationFileError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}; "
            f"the file is damaged or incomplete, re-download or fix it"
        ) from None
    except (UnicodeDecodeError, OSError) as err:
        raise AnnotationFileError(f"{path}: cannot read ({err}); re-download the file") from None


def parse_image_id(value: Any, file_name: str | None) -> int | None:
    """COCO image id from an int, a string ending in digits ("COCO_val2014_000000391895", "coco_42"),
    or else from the digits at the end of the file name; None if none of these give one."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _TRAILING_DIGITS.search(value.strip())):
        return int(m.group(1))
    if file_name and (m := _NAME_DIGITS.search(file_name)):
        return int(m.group(1))
    return None


def _read_coco_captions(obj: dict, source: str, col: Collection) -> None:
    names: dict[int, str] = {}
    for entry in obj.get("images") or []:
        iid = entry.get("id") if isinstance(entry, dict) else None
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(iid, int) or not isinstance(name, str) or not name:
            col.reject("image_entry", "malformed_image_entry", source, f"images[] entry {str(entry)[:120]}")
        elif iid in names and names[iid] != name:
            col.reject("image_entry", "duplicate_image_entry", source, f"id {iid}: {names[iid]} and {name}", image_id=iid)
        else:
            names[iid] = name
    for ann in obj.get("annotations") or []:
        if not isinstance(ann, dict):
            col.units_in["caption"] += 1
            col.reject("caption", "malformed_entry", source, f"annotation {str(ann)[:120]}")
            continue
        iid = ann.get("image_id")
        if iid not in names:
            col.units_in["caption"] += 1
            col.reject("caption", "unknown_image_id", source, f"image_id {iid!r} is not in this file's images[]",
                       image_id=iid, ann_id=ann.get("id"))
            continue
        col.add_caption(iid, names[iid], ann.get("caption"), source, ann.get("id"))


def _read_karpathy(obj: list, source: str, col: Collection) -> None:
    for entry in obj:
        if not isinstance(entry, dict):
            col.units_in["caption"] += 1
            col.reject("caption", "malformed_entry", source, f"entry {str(entry)[:120]}")
            continue
        name = entry.get("image")
        caps = entry.get("caption")
        caps = caps if isinstance(caps, list) else [caps]
        iid = parse_image_id(entry.get("image_id"), name if isinstance(name, str) else None)
        if iid is None or not isinstance(name, str) or not name:
            for cap in caps:
                col.units_in["caption"] += 1
                col.reject("caption", "unknown_image_id", source,
                           f"no usable image id/file in {str(entry)[:120]}", caption=cap)
            continue
        for cap in caps:
            col.add_caption(iid, name, cap, source)


def read_caption_file(path: Path, col: Collection) -> None:
    """Read one COCO captions or Karpathy file into `col` (AnnotationFileError if unusable)."""
    obj = load_json(path)
    source = str(path)
    if isinstance(obj, dict) and "annotations" in obj and "images" in obj:
        _read_coco_captions(obj, source, col)
    elif isinstance(obj, list) and (not obj or (isinstance(obj[0], dict) and "image" in obj[0])):
        _read_karpathy(obj, source, col)
    elif isinstance(obj, dict) and "questions" in obj:
        raise AnnotationFileError(f"{path}: this is a VQA questions file; pass it with --vqa-questions, not --ann")
    else:
        raise AnnotationFileError(
            f"{path}: not a COCO captions file (needs 'images' and 'annotations') nor a Karpathy split "
            f"(a list of {{'image', 'caption'}}); pass caption files to --ann"
        )
    col.files_read.append(source)


def read_vqa(questions: Path, annotations: Path, col: Collection, find_image) -> None:
    """Join VQA v2 questions and answers on question_id; `find_image(image_id)` returns a file name for
    images that no caption file named (or None: the question is rejected as unknown_image_id)."""
    qobj, aobj = load_json(questions), load_json(annotations)
    if not isinstance(qobj, dict) or not isinstance(qobj.get("questions"), list):
        raise AnnotationFileError(f"{questions}: not a VQA v2 questions file (needs a 'questions' list)")
    if not isinstance(aobj, dict) or not isinstance(aobj.get("annotations"), list):
        raise AnnotationFileError(f"{annotations}: not a VQA v2 annotations file (needs an 'annotations' list)")
    qsrc, asrc = str(questions), str(annotations)
    answers: dict[Any, dict] = {}
    for ann in aobj["annotations"]:
        qid = ann.get("question_id") if isinstance(ann, dict) else None
        if qid is None or qid in answers:  # a record that joins no question is a unit of its own
            col.units_in["qa"] += 1
            reason = "malformed_entry" if qid is None else "duplicate_answer"
            col.reject("qa", reason, asrc, f"annotation {str(ann)[:120]}", question_id=qid)
        else:
            answers[qid] = ann
    seen: set = set()
    for q in qobj["questions"]:
        col.units_in["qa"] += 1
        if not isinstance(q, dict):
            col.reject("qa", "malformed_entry", qsrc, f"question {str(q)[:120]}")
            continue
        qid, iid, text = q.get("question_id"), q.get("image_id"), q.get("question")
        ids = {"image_id": iid, "question_id": qid}
        if qid in seen:
            col.reject("qa", "duplicate_question", qsrc, f"question_id {qid} repeated", **ids)
            continue
        seen.add(qid)
        text = " ".join(text.split()) if isinstance(text, str) else ""
        if not text:
            col.reject("qa", "empty_question", qsrc, "question text is empty", **ids)
            continue
        ann = answers.get(qid)
        if ann is None:
            col.reject("qa", "no_answer", asrc, f"question_id {qid} has no entry in the annotations file", **ids)
            continue
        answer = ann.get("multiple_choice_answer")
        answer = " ".join(answer.split()) if isinstance(answer, str) else ""
        if not answer:
            col.reject("qa", "empty_answer", asrc, "multiple_choice_answer is empty", **ids)
            continue
        name = None
        if iid not in col.images:
            name = find_image(iid) if isinstance(iid, int) else None
            if name is None:
                col.reject("qa", "unknown_image_id", qsrc, f"image_id {iid!r} is in no caption file and no image "
                           f"file with that id was found", **ids)
                continue
        # Every annotator's answer, repeats kept (VQA accuracy counts them), plus the question/answer types.
        all_answers = [a["answer"] for a in ann.get("answers") or [] if isinstance(a, dict) and isinstance(a.get("answer"), str)]
        types = {k: ann[k] for k in ("question_type", "answer_type") if isinstance(ann.get(k), str)}
        col.image(iid, name, qsrc).qa.append(
            {"question_id": qid, "question": text, "answer": answer, "answers": all_answers, **types, "source": qsrc})
    for qid in [q for q in answers if q not in seen]:  # answers to no question: a unit each, rejected
        col.units_in["qa"] += 1
        col.reject("qa", "unknown_question_id", asrc, f"question_id {qid} is not in the questions file", question_id=qid)
    col.files_read += [qsrc, asrc]
