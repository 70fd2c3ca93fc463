"""shard-coco: each published format, bad inputs, accounting, determinism, crash safety, the CLI.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_data_shard.py
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import typer
from typer.testing import CliRunner

from vlm_dist.cli import app
from vlm_dist.data.shard import ShardError, shard_coco

REPO = Path(__file__).resolve().parents[1]


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def photo(seed: int, w: int = 48, h: int = 40) -> Image.Image:
    """Flat 8x8-pixel colour blocks: distinct per seed, and JPEG keeps their colours."""
    blocks = np.random.default_rng(seed).integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w].copy())


def put(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def read_tars(out: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over all shards, checking members come in sorted order."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            assert names == sorted(names)
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def quiet(**kw):
    return {"progress": False, "log": lambda m: None, **kw}


def coco_captions(images: list[tuple[int, str]], anns: list[tuple[int, str]]) -> dict:
    return {"images": [{"id": i, "file_name": f} for i, f in images],
            "annotations": [{"id": k + 1, "image_id": i, "caption": c} for k, (i, c) in enumerate(anns)]}


def test_official_coco_captions_keep_original_bytes(tmp_path):
    imgs = tmp_path / "train2017"
    for i in (1, 2, 3):
        put(imgs, f"{i:012d}.jpg", encode(photo(i)))
    ann = dump(tmp_path / "captions_train2017.json", coco_captions(
        [(i, f"{i:012d}.jpg") for i in (1, 2, 3)], [(1, "a dog"), (2, "a cat"), (1, "a  brown dog "), (3, "a bird")]))
    summary = shard_coco(imgs, [ann], tmp_path / "out", shard_size=2, **quiet())
    assert (summary["samples"], summary["captions"], summary["rejected"], summary["shards"]) == (3, 4, 0, 2)
    samples = read_tars(tmp_path / "out")
    assert sorted(samples) == ["000000000001", "000000000002", "000000000003"]
    one = samples["000000000001"]
    meta = json.loads(one["json"])
    assert meta["captions"] == ["a dog", "a brown dog"] and one["txt"] == b"a dog"  # whitespace normalised
    assert one["jpg"] == (imgs / "000000000001.jpg").read_bytes() and meta["converted"] is None
    assert (meta["width"], meta["height"], meta["image_id"]) == (48, 40, 1)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [2, 1] and manifest["totals"]["samples"] == 3
    assert manifest["options"] == {"shard_size": 2, "resize": None, "verify": "header"}
    assert json.loads((tmp_path / "out" / "00001_stats.json").read_text())["samples"] == 1


def test_karpathy_train_and_val_with_string_and_missing_ids(tmp_path):
    root = tmp_path / "coco"
    put(root, "train2014/COCO_train2014_000000000011.jpg", encode(photo(11)))
    put(root, "val2014/COCO_val2014_000000000012.jpg", encode(photo(12)))
    put(root, "val2014/COCO_val2014_000000000013.jpg", encode(photo(13)))
    train = dump(tmp_path / "coco_karpathy_train.json", [
        {"image": "train2014/COCO_train2014_000000000011.jpg", "caption": "a red bus", "image_id": "coco_11"},
        {"image": "train2014/COCO_train2014_000000000011.jpg", "caption": "a bus on a road", "image_id": "coco_11"},
    ])
    val = dump(tmp_path / "coco_karpathy_val.json", [
        {"image": "val2014/COCO_val2014_000000000012.jpg", "caption": ["a tree", "one tree"],
         "image_id": "COCO_val2014_000000000012"},
        {"image": "val2014/COCO_val2014_000000000013.jpg", "caption": ["a lake"]},  # no image_id: from the name
    ])
    summary = shard_coco(root, [train, val], tmp_path / "out", **quiet())
    assert (summary["samples"], summary["captions"], summary["rejected"]) == (3, 5, 0)
    samples = read_tars(tmp_path / "out")
    assert json.loads(samples["000000000011"]["json"])["captions"] == ["a red bus", "a bus on a road"]
    assert json.loads(samples["000000000012"]["json"])["captions"] == ["a tree", "one tree"]
    meta13 = json.loads(samples["000000000013"]["json"])
    assert meta13["image_id"] == 13 and meta13["file_name"] == "val2014/COCO_val2014_000000000013.jpg"


def test_vqa_v2_joined_and_every_unit_accounted(tmp_path):
    imgs = tmp_path / "val2014"
    for i in (1, 2, 5):
        put(imgs, f"COCO_val2014_{i:012d}.jpg", encode(photo(i)))
    put(imgs, "COCO_val2014_000000000006.jpg", b"not an image")  # its question must be counted as rejected
    caps = dump(tmp_path / "caps.json", coco_captions(
        [(1, "COCO_val2014_000000000001.jpg"), (2, "COCO_val2014_000000000002.jpg")], [(1, "a cup"), (2, "a pen")]))
    qs = dump(tmp_path / "q.json", {"questions": [
        {"image_id": 1, "question": "what is it?", "question_id": 10},
        {"image_id": 2, "question": "what colour?", "question_id": 20},
        {"image_id": 5, "question": "how many?", "question_id": 50},  # only in VQA: found on disk by id
        {"image_id": 99, "question": "where?", "question_id": 990},  # no such image anywhere
        {"image_id": 1, "question": "no answer here?", "question_id": 11},
        {"image_id": 1, "question": "   ", "question_id": 12},
        {"image_id": 1, "question": "what is it?", "question_id": 10},  # duplicate question id
        {"image_id": 6, "question": "what shape?", "question_id": 60},  # an image that is not one
    ]})
    answers = dump(tmp_path / "a.json", {"annotations": [
        {"question_id": q, "multiple_choice_answer": a, "answers": [{"answer": a}, {"answer": "x"}]}
        for q, a in [(10, "cup"), (20, "blue"), (50, "two"), (990, "here"), (12, "x"), (777, "orphan"), (60, "ball")]]})
    out = tmp_path / "out"
    summary = shard_coco(imgs, [caps], out, vqa_questions=qs, vqa_annotations=answers, **quiet())
    assert summary["rejects_by_reason"] == {"duplicate_question": 1, "empty_question": 1, "no_answer": 1,
                                            "unknown_image_id": 1, "unknown_question_id": 1, "unreadable_image": 1}
    assert (summary["qa_read"], summary["qa"], summary["captions"]) == (9, 3, 2)
    assert summary["captions"] + summary["qa"] + summary["rejected"] == summary["annotations_read"]
    samples = read_tars(out)
    meta1 = json.loads(samples["000000000001"]["json"])
    assert meta1["qa"] == [{"question_id": 10, "question": "what is it?", "answer": "cup", "answers": ["cup", "x"]}]
    assert "txt" not in samples["000000000005"]  # Q&A-only image: no caption member
    assert json.loads(samples["000000000005"]["json"])["qa"][0]["answer"] == "two"
    lines = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(lines) == summary["rejected"] and all(r["reason"] and r["source"] for r in lines)
    assert [r["question_id"] for r in lines if r["kind"] == "qa" and r["reason"] == "unreadable_image"] == [60]
    assert "000000000006" not in samples


def bad_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """One image per documented outcome, and a captions file naming them (+ caption-level problems)."""
    imgs = tmp_path / "imgs"
    rgb = photo(0)
    png16 = Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 100)
    good = encode(rgb)
    bad_crc = bytearray(encode(rgb, "PNG"))
    bad_crc[60] ^= 0xFF
    files = {1: good, 2: encode(rgb.convert("L")), 3: encode(rgb.convert("CMYK")), 4: encode(rgb, "PNG"),
             5: good[: len(good) // 2], 6: b"this is not an image", 7: b"", 9: encode(png16, "PNG"), 10: bytes(bad_crc)}
    for i, data in files.items():
        put(imgs, f"{i}.jpg", data)
    names = [(i, f"{i}.jpg") for i in range(1, 11)]  # 8.jpg does not exist
    anns = [(i, f"picture {i}") for i in range(1, 11)] + [(1, ""), (1, "Picture  1"), (77, "unknown id")]
    obj = coco_captions(names, anns)
    obj["annotations"].append(dict(obj["annotations"][1]))  # repeated annotation id
    return imgs, dump(tmp_path / "captions.json", obj)


EXPECTED_REJECTS = {"corrupt_image": 1, "duplicate_annotation": 1, "duplicate_caption": 1, "empty_caption": 1,
                    "empty_file": 1, "missing_image": 1, "truncated_image": 1, "unknown_image_id": 1,
                    "unreadable_image": 1, "unsupported_mode": 1}


def test_bad_inputs_each_get_their_outcome(tmp_path):
    imgs, ann = bad_inputs(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "annotations": [\n  {"id": 1,, }]}')
    logged: list[str] = []
    summary = shard_coco(imgs, [ann, broken], tmp_path / "out", progress=False, log=logged.append)
    assert summary["rejects_by_reason"] == EXPECTED_REJECTS
    assert summary["captions_read"] == 14 and summary["captions"] + summary["rejected"] == 14
    assert sorted(summary["converted_by_reason"]) == ["CMYK (CMYK) -> RGB", "PNG bytes named .jpg",
                                                      "grayscale (L) -> RGB"]
    assert len(summary["file_errors"]) == 1 and "broken.json: malformed JSON at line 2 column" in summary["file_errors"][0]
    assert any("broken.json" in m for m in logged) and summary["other_rejects"] == {"bad_annotation_file": 1}
    samples = read_tars(tmp_path / "out")
    assert sorted(samples) == [f"{i:012d}" for i in (1, 2, 3, 4)]
    for key in ("000000000002", "000000000003", "000000000004"):  # converted: now RGB JPEGs
        img = Image.open(io.BytesIO(samples[key]["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB") and json.loads(samples[key]["json"])["converted"]
    cmyk = np.asarray(Image.open(io.BytesIO(samples["000000000003"]["jpg"])), dtype=float)
    assert np.abs(cmyk - np.asarray(photo(0), dtype=float)).mean() < 12  # colours survived the conversion
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_image = {r["image_id"]: r["reason"] for r in rejects if r["kind"] == "caption"}
    assert by_image[5] == "truncated_image" and by_image[7] == "empty_file" and by_image[9] == "unsupported_mode"


def test_fatal_problems_exit_nonzero_with_a_clear_message(tmp_path):
    runner = CliRunner()
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    (tmp_path / "imgs").mkdir()
    res = runner.invoke(app, ["shard-coco", "--images", str(tmp_path / "imgs"), "--ann", str(broken),
                              "--out", str(tmp_path / "o1"), "--no-progress"])
    assert res.exit_code == 2 and "no readable annotation file" in res.output and "malformed JSON" in res.output
    ann = dump(tmp_path / "c.json", coco_captions([(1, "1.jpg")], [(1, "a")]))
    res = runner.invoke(app, ["shard-coco", "--images", str(tmp_path / "imgs"), "--ann", str(ann),
                              "--out", str(tmp_path / "o2"), "--no-progress"])
    assert res.exit_code == 2 and "no images" in res.output and "--images" in res.output
    put(tmp_path / "imgs", "1.jpg", b"")  # exists but unreadable: still nothing to write
    with pytest.raises(ShardError, match="no images at all"):
        shard_coco(tmp_path / "imgs", [ann], tmp_path / "o3", **quiet())
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["rejects_by_reason"] == {"empty_file": 1}


def many_images(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    imgs = tmp_path / "imgs"
    for i in range(1, n + 1):
        put(imgs, f"{i}.jpg", encode(photo(i) if i % 5 else photo(i).convert("L")))
    return imgs, dump(tmp_path / "c.json", coco_captions([(i, f"{i}.jpg") for i in range(1, n + 1)],
                                                          [(i, f"image number {i}") for i in range(1, n + 1)]))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def test_deterministic_bytes_across_runs_and_worker_counts(tmp_path):
    imgs, ann = many_images(tmp_path)
    a = shard_coco(imgs, [ann], tmp_path / "a", shard_size=5, workers=1, resize=32, **quiet())
    shard_coco(imgs, [ann], tmp_path / "b", shard_size=5, workers=2, resize=32, **quiet())
    assert a["resized"] == 24 and a["shards"] == 5
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") and len(shard_bytes(tmp_path / "a")) == 5
    for name in ("manifest.json", "rejects.jsonl", "00004_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads(read_tars(tmp_path / "a")["000000000001"]["json"])
    assert (meta["original_width"], meta["original_height"], meta["height"], meta["resized"]) == (48, 40, 32, True)


KILLER = """
import os, signal, sys
from pathlib import Path
from vlm_dist.data import tario
from vlm_dist.data.shard import shard_coco
calls = 0
real_add = tario.TarWriter.add
def add(self, name, data):  # the machine dies in the middle of the second shard
    global calls
    calls += 1
    if calls == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    real_add(self, name, data)
tario.TarWriter.add = add
shard_coco(Path(sys.argv[1]), [Path(sys.argv[2])], Path(sys.argv[3]), shard_size=5, progress=False)
"""


def test_killed_run_leaves_no_truncated_shard_and_rerun_completes(tmp_path):
    imgs, ann = many_images(tmp_path)
    shard_coco(imgs, [ann], tmp_path / "clean", shard_size=5, **quiet())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(imgs), str(ann), str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    names = sorted(p.name for p in out.iterdir())
    assert names[0].startswith(".train-00001.tar.tmp-")  # 15 members = 5 samples into shard 0, 5 into shard 1
    assert "train-00000.tar" in names and "train-00001.tar" not in names and "manifest.json" not in names
    logged: list[str] = []
    summary = shard_coco(imgs, [ann], out, shard_size=5, progress=False, log=logged.append)
    assert summary["shards_kept"] == 1 and any("incomplete temp file" in m for m in logged)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # A shard damaged after the fact is detected (sha256) and rewritten, not kept.
    (out / "train-00002.tar").write_bytes(b"\0" * 10240)
    again = shard_coco(imgs, [ann], out, shard_size=5, **quiet())
    assert again["shards_kept"] == 4 and shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_cli_help_explains_every_option_and_the_tool_wrapper_works(tmp_path):
    runner = CliRunner()
    commands = typer.main.get_command(app).commands
    for cmd, options in [("shard-coco", {"--images", "--ann", "--out", "--vqa-questions", "--vqa-annotations",
                                         "--split", "--shard-size", "--resize", "--workers", "--verify", "--progress"}),
                         ("demo-data", {"--out", "--train", "--val", "--seed", "--image-size", "--shard"})]:
        params = {p.opts[0]: p for p in commands[cmd].params}
        assert options <= set(params)
        assert all(len(p.help or "") > 10 for p in params.values()), f"{cmd}: an option has no help text"
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
        assert res.exit_code == 0 and all(opt in res.output for opt in options)
    imgs, ann = many_images(tmp_path, n=3)
    proc = subprocess.run([sys.executable, "tools/shard_coco.py", "--images", str(imgs), "--ann", str(ann),
                           "--out", str(tmp_path / "out"), "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "images written   3" in proc.stdout and (tmp_path / "out" / "train-00000.tar").is_file()


def jpeg_with_thumbnail_marker(seed: int) -> bytes:
    """A real RGB JPEG with an APP1 segment holding the bytes FFD9 (as an EXIF thumbnail's end does)
    before the scan: a cut-short copy must still be caught although FFD9 occurs in the file."""
    good = encode(photo(seed, 64, 48))
    payload = b"Exif\0\0" + b"\xff\xd8thumb\xff\xd9"
    return good[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + good[2:]


@pytest.mark.parametrize("verify", ["full", "header", "none"])
def test_verify_levels_report_and_count_damaged_files(tmp_path, verify):
    """Every damaged file is a counted, reported reject at full and header (the default); at none,
    zero-byte and non-image files still are, and cut-short JPEGs are written (documented)."""
    good, thumb = encode(photo(1, 64, 48)), jpeg_with_thumbnail_marker(2)
    files = {1: good, 2: thumb, 3: good + b"\0" * 7 + b"trailer",  # bytes after EOI: kept, as libjpeg allows
             4: good[: len(good) - 2],  # end-of-image marker cut off
             5: good[: len(good) * 2 // 3],  # cut inside the scan data
             6: thumb[: len(thumb) - 40],  # cut short, FFD9 still present inside the APP1 segment
             7: good[:40],  # cut inside the headers
             8: b"GIF89a not really", 9: b"", 10: b"\xff\xd8" + bytes(100)}
    imgs = tmp_path / "imgs"
    for i, data in files.items():
        put(imgs, f"{i}.jpg", data)
    ann = dump(tmp_path / "c.json", coco_captions([(i, f"{i}.jpg") for i in files], [(i, f"pic {i}") for i in files]))
    out = tmp_path / "out"
    summary = shard_coco(imgs, [ann], out, verify=verify, **quiet())
    rejects = {r["image_id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    written = sorted(int(k) for k in read_tars(out))
    assert summary["samples"] == len(written) and summary["rejected"] == len(rejects) == len(files) - len(written)
    assert summary["verify"] == verify and json.loads((out / "manifest.json").read_text())["options"]["verify"] == verify
    assert rejects[8] == "unreadable_image" and rejects[9] == "empty_file"  # at every level
    assert read_tars(out)["000000000003"]["jpg"] == files[3]  # kept as is, trailer included
    if verify == "none":
        assert written == [1, 2, 3, 4, 5, 6]  # only the header is read: cut-short files go through
        return
    assert written == [1, 2, 3]
    assert {i: rejects[i] for i in (4, 5, 6)} == {4: "truncated_image", 5: "truncated_image", 6: "truncated_image"}
    assert rejects[7] in ("truncated_image", "corrupt_image") and rejects[10] == "unreadable_image"
    assert summary["captions"] + summary["rejected"] == summary["captions_read"] == len(files)


def test_verify_level_is_part_of_the_plan_and_checked(tmp_path):
    imgs, ann = many_images(tmp_path, n=4)
    out = tmp_path / "out"
    shard_coco(imgs, [ann], out, shard_size=2, verify="none", **quiet())
    assert shard_coco(imgs, [ann], out, shard_size=2, verify="none", **quiet())["shards_kept"] == 2
    again = shard_coco(imgs, [ann], out, shard_size=2, verify="full", **quiet())  # stricter: recheck all
    assert again["shards_kept"] == 0 and again["samples"] == 4
    with pytest.raises(ShardError, match="--verify 'fast': use one of full, header, none"):
        shard_coco(imgs, [ann], out, verify="fast", **quiet())
    res = CliRunner().invoke(app, ["shard-coco", "--images", str(imgs), "--ann", str(ann), "--out", str(out),
                                   "--no-progress", "--verify", "fast"])
    assert res.exit_code == 2 and "use one of full, header, none" in res.output


def test_tar_writer_bytes_equal_tarfile(tmp_path):
    """TarWriter writes its headers itself (no tarfile.addfile): the bytes must be tarfile's, for
    names on the fast path and for those it hands to tarfile (over 100 bytes, non-ASCII)."""
    import tarfile as tf

    from vlm_dist.data.tario import TarWriter, _member_info, file_sha256

    members = [("000000000001.jpg", encode(photo(3))), ("000000000001.json", b'{"a": 1}'),
               ("000000000001.txt", b""), ("d" * 30 + "/" + "x" * 90 + ".txt", b"long name"), ("z\u00e9.txt", b"x" * 512)]
    with TarWriter(tmp_path / "ours.tar") as w:
        for name, data in members:
            w.add(name, data)
    with tf.open(tmp_path / "ref.tar", "w", format=tf.USTAR_FORMAT) as ref:
        for name, data in members:
            info = _member_info(name)
            info.size = len(data)
            ref.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert w.sha256 == file_sha256(tmp_path / "ref.tar") and w.size == (tmp_path / "ref.tar").stat().st_size


def test_resize_gives_torchvision_resize_geometry(tmp_path):
    """--resize N stores the size torchvision's Resize(N) gives (long side floored: 47x40 -> 37x32, not
    38x32), so a tower of input N only centre-crops the stored image, where the crop would have been."""
    import torch
    from torchvision.transforms import functional as TF

    imgs = tmp_path / "imgs"
    put(imgs, "1.jpg", encode(photo(1, 47, 40)))
    put(imgs, "2.jpg", encode(photo(2, 40, 61)))
    ann = dump(tmp_path / "c.json", coco_captions([(1, "1.jpg"), (2, "2.jpg")], [(1, "a"), (2, "b")]))
    shard_coco(imgs, [ann], tmp_path / "out", resize=32, **quiet())
    samples = read_tars(tmp_path / "out")
    for key, (w, h) in (("000000000001", (47, 40)), ("000000000002", (40, 61))):
        meta = json.loads(samples[key]["json"])
        want = TF.resize(torch.zeros(3, h, w), [32]).shape[1:]  # (H, W) torchvision's rule
        assert (meta["height"], meta["width"]) == tuple(want) and Image.open(io.BytesIO(samples[key]["jpg"])).size == (want[1], want[0])
