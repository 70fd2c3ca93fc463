"""The field's metrics: VQA v2 accuracy and COCO caption scores, computed as the official tools do.

    from vlm_dist.infer.metrics import vqa_accuracy, caption_scores
    vqa_accuracy("Two", ["2"] * 10)                      # 1.0 (answer normalisation, then min(#/3, 1))
    caption_scores({1: "a red circle"}, {1: ["a red circle"]})   # BLEU-1..4, METEOR, ROUGE-L, CIDEr

VQA: `vqa_accuracy` follows the VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py): the prediction
is normalised (punctuation, number words -> digits, articles dropped, contractions restored); the ten
human answers are punctuation-normalised only when they disagree; the score is min(#matching / 3, 1)
averaged over the ten leave-one-annotator-out subsets of nine.

Captions: with Java present, `caption_scores` runs pycocoevalcap's own pipeline (pycocotools COCO +
loadRes on the results file, its Stanford PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE
is left out: it downloads Stanford CoreNLP models on first use). Without Java the captions are tokenised
by a Python approximation of that tokenizer, METEOR is not run, and the result says so
(`tokenizer` = "java-free"): those numbers are not comparable with published ones.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

# --- VQA v2 answer normalisation (the tables of the official vqaEval.py) -------------------------

_CONTRACTIONS_LIST = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
# The official table maps what annotators typed without an apostrophe to the proper spelling: "dont" ->
# "don't"; for forms with several apostrophes, each spelling missing one of them: "couldnt've",
# "couldn'tve" -> "couldn't've". (Its keys "Id", "Im", "Ive" never match lower-cased text; kept as is.)
CONTRACTIONS: dict[str, str] = {}
for _word in _CONTRACTIONS_LIST:
    _marks = [i for i, c in enumerate(_word) if c == "'"]
    if len(_marks) == 1:
        CONTRACTIONS[_word.replace("'", "")] = _word
    else:
        for _i in _marks:
            CONTRACTIONS[_word[:_i] + _word[_i + 1:]] = _word
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a no-op lookahead) kept as is
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def vqa_punctuation(text: str) -> str:
    """processPunctuation: a mark next to a space (or any mark, when a digit,digit comma is present) is
    deleted, otherwise replaced by a space; then periods not inside numbers are dropped."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # sic: the official call passes re.UNICODE (32) as the count


def vqa_digits_articles(text: str) -> str:
    """processDigitArticle: lower case, number words -> digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """How the official script normalises a predicted answer: 'Two', '2' and 'two.' all become '2'."""
    return vqa_digits_articles(vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA v2 accuracy of one prediction against the annotators' answers (10 in VQA v2, with
    repeats): mean over the leave-one-out subsets of min(#answers in the subset equal to it / 3, 1).
    3 of 10 annotators -> 1.0; 1 of 10 -> 0.3 (the nine subsets that keep that annotator give 1/3)."""
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs the annotators' answers (10 in VQA v2), got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:  # the official script normalises the human answers only when they disagree
        gts = [vqa_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


# --- captions ------------------------------------------------------------------------------------

PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}  # what pycocoevalcap's tokenizer drops after Stanford PTB tokenisation


def java_free_tokenize(text: str) -> str:
    """A Python approximation of pycocoevalcap's PTBTokenizer (-lowerCase, punctuation tokens dropped):
    lower case, punctuation split off and dropped, clitics ('s, n't) split as PTB does. Exact for plain
    captions like the demo's; on real captions the tokens can differ, so scores are not comparable."""
    text = text.replace("\n", " ").lower()
    text = re.sub(r"(n't|'s|'re|'ve|'ll|'d|'m)\b", r" \1", text)
    tokens = re.findall(r"n't|'[a-z]+|[a-z0-9]+(?:[.,][0-9]+)*|[^\sa-z0-9]", text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and re.search(r"[a-z0-9]", t))


def java_available() -> bool:
    return shutil.which("java") is not None


def write_caption_files(predictions: dict[int, str], references: dict[int, list[str]], results: Path,
                        reference_file: Path) -> None:
    """The COCO results file ([{image_id, caption}]) and a COCO captions reference file for the same
    images, so that pycocotools `COCO(reference_file).loadRes(results)` loads them."""
    images = [{"id": i} for i in predictions]
    anns = [{"image_id": i, "id": n, "caption": c}
            for n, (i, c) in enumerate(((i, c) for i in predictions for c in references[i]), start=1)]
    reference_file.write_text(json.dumps({"info": {}, "licenses": [], "type": "captions", "images": images,
                                          "annotations": anns}))
    results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))


def _check(predictions: dict[int, str], references: dict[int, list[str]]) -> None:
    bad = [i for i in predictions if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"caption image ids must be integers (COCO image_id), got {bad[:3]!r}")
    missing = [i for i in predictions if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")


def caption_scores(predictions: dict[int, str], references: dict[int, list[str]], java: bool | None = None,
                   meteor: bool = True, files: tuple[Path, Path] | None = None) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one predicted caption per image id.

    java=None uses Java where it is installed. With Java: the official pipeline through the files
    `files` = (results, reference file) (temporary ones if None), loaded by pycocotools; METEOR unless
    meteor=False. Returns the scores plus "tokenizer": "ptb" (official) or "java-free" (not comparable).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(predictions, references)
    if not predictions:
        return {}
    java = java_available() if java is None else java
    if java:
        with tempfile.TemporaryDirectory() as tmp:
            results, ref_file = files or (Path(tmp) / "results.json", Path(tmp) / "references.json")
            write_caption_files(predictions, references, results, ref_file)
            gts, res = _official_tokenized(results, ref_file)
    else:
        gts = {i: [java_free_tokenize(r) for r in references[i]] for i in predictions}
        res = {i: [java_free_tokenize(c)] for i, c in predictions.items()}
    scores: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        del scorer  # closes its Java process
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["tokenizer"] = "ptb" if java else "java-free"
    return scores


def _official_tokenized(results: Path, reference_file: Path) -> tuple[dict, dict]:
    """COCOEvalCap.evaluate's first half: COCO + loadRes, then the PTB tokenizer on both sides."""
    from pycocotools.coco import COCO
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with redirect_stdout(StringIO()):  # pycocotools prints index-building chatter
        coco = COCO(str(reference_file))
        coco_res = coco.loadRes(str(results))
    ids = coco.getImgIds()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    res = tok.tokenize({i: coco_res.imgToAnns[i] for i in ids})
    return gts, res


def scores_note(scores: dict) -> str:
    """One line saying how the caption scores were computed (and whether they are comparable)."""
    if scores.get("tokenizer") == "ptb":
        extra = "" if "METEOR" in scores else "; METEOR not run"
        return f"pycocoevalcap pipeline with its PTB tokenizer (Java), comparable with COCO papers; SPICE not run{extra}"
    return ("Java-free tokenisation (no `java` found): BLEU/ROUGE-L/CIDEr NOT comparable with published "
            "scores; METEOR and SPICE not run (install a JRE, e.g. apt-get install default-jre-headless)")
