"""The streaming loader: round trip, equal epochs across ranks, exact resume, safety, clear errors.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_data_loader.py
"""

from __future__ import annotations

import json
import pickle
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch

from vlm_dist.config import load_config
from vlm_dist.data.demo import make_demo_data
from vlm_dist.data.loader import ShardMismatchError, build_loader
from vlm_dist.data.manifest import ShardSpecError
from vlm_dist.data.shard import shard_coco
from vlm_dist.data.tario import TarWriter, write_json_atomic
from vlm_dist.text import IGNORE_INDEX, get_tokenizer, validate_targets

N_TRAIN = 120


@pytest.fixture(scope="module")
def demo(module_dir) -> dict:
    """Demo set (120 images, ~660 questions) -> shard-coco (shards of 32: 32/32/32/24) + the truth."""
    root = module_dir("demo")
    paths = make_demo_data(root, n_train=N_TRAIN, n_val=0, seed=5)["train"]
    shard_coco(paths["images"], [paths["captions"]], root / "shards", vqa_questions=paths["vqa_questions"],
               vqa_annotations=paths["vqa_annotations"], shard_size=32, progress=False, log=lambda m: None)
    caps = {a["image_id"]: a["caption"] for a in json.loads(paths["captions"].read_text())["annotations"]}
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in json.loads(paths["vqa_annotations"].read_text())["annotations"]}
    qa = {}
    for q in json.loads(paths["vqa_questions"].read_text())["questions"]:
        qa.setdefault(q["image_id"], {})[q["question"]] = answers[q["question_id"]]
    return {"shards": str(root / "shards"), "captions": caps, "qa": qa, "root": root}


def cfg_with(*overrides: str):
    return load_config("tiny", ["data.shuffle_buffer=16", *overrides])


def run(loader) -> list[dict]:
    return list(loader)


def flat(batches: list[dict], field: str) -> list:
    return [x for b in batches for x in b[field]]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and x["kinds"] == y["kinds"] and torch.equal(x["input_ids"], y["input_ids"])
        and torch.equal(x["targets"], y["targets"]) and torch.equal(x["images"], y["images"])
        and torch.equal(x["is_pad"], y["is_pad"]) for x, y in zip(a, b))


def test_round_trip_two_ranks_two_workers_every_image_once(demo):
    cfg = cfg_with()
    tok = get_tokenizer()
    loaders = [build_loader(cfg, demo["shards"], rank=r, world_size=2, micro_batch=4, train=True, num_workers=2)
               for r in range(2)]
    per_rank = [run(loader) for loader in loaders]
    assert [len(b) for b in per_rank] == [loaders[0].batches_per_epoch] * 2 == [16, 16]  # 4 slots x 32 / 4
    seen = [i for batches in per_rank for b in batches for i, pad in zip(b["image_ids"], b["is_pad"]) if not pad]
    assert sorted(seen) == sorted(demo["captions"])  # every image exactly once across ranks
    pads = sum(int(b["is_pad"].sum()) for batches in per_rank for b in batches)
    assert pads == 4 * 32 - N_TRAIN == sum(ld.stats["pad_samples"] for ld in loaders)
    assert sum(ld.stats["planned_pad_rank"] for ld in loaders) == pads
    kinds = flat(per_rank[0] + per_rank[1], "kinds")
    assert 0.3 < kinds.count("qa") / len(kinds) < 0.7  # qa_fraction = 0.5
    for b in per_rank[0] + per_rank[1]:
        assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.uint8
        assert b["input_ids"].shape == (4, 23) and b["targets"].shape == (4, 2, 23)
        validate_targets(b["input_ids"], b["targets"], tok.vocab_size)
        for j, (iid, kind, q, refs) in enumerate(zip(b["image_ids"], b["kinds"], b["questions"], b["references"])):
            labels = [t for t in b["targets"][j, 0].tolist() if t != IGNORE_INDEX]
            target_text = tok.decode(labels)  # what the loss trains on (the end token stops decode)
            if kind == "caption":
                assert q is None and refs == [demo["captions"][iid]] and target_text == refs[0]
                text = refs[0]
            else:
                assert refs == [demo["qa"][iid][q]] and target_text == refs[0]
                text = f"question: {q} answer: {refs[0]}"
            assert tok.decode(b["input_ids"][j]) == tok.decode(tok.encode(text))  # the whole input, prompt included


def test_exact_resume_and_determinism_with_workers(demo):
    cfg = cfg_with()
    loader = build_loader(cfg, demo["shards"], rank=1, world_size=2, micro_batch=4, train=True, num_workers=2)
    loader.set_epoch(1)
    full = run(loader)
    loader.set_epoch(1)
    assert same_batches(run(loader), full)  # a pure function of (seed, epoch, rank, ...)
    for k in (5, 8):  # odd and even: resumes on either worker
        loader.set_epoch(1, skip_batches=k)
        assert same_batches(run(loader), full[k:])
    loader.set_epoch(2)
    assert flat(run(loader), "keys") != flat(full, "keys")  # a new order each epoch
    in_process = build_loader(cfg, demo["shards"], rank=1, world_size=2, micro_batch=4, train=True, num_workers=0)
    in_process.set_epoch(1, skip_batches=3)
    tail = run(in_process)
    in_process.set_epoch(1)
    assert same_batches(run(in_process)[3:], tail)
    # Iterating leaves the global torch RNG alone (the trainer's checkpoint restores it, and dropout draws from
    # it): a DataLoader iterator without its own generator seeds its workers with a draw from it, which a resumed
    # run makes once more than the uninterrupted one.
    state = torch.get_rng_state()
    loader.set_epoch(1, skip_batches=5)
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
    big = build_loader(cfg_with("train.seed=2147483647"), demo["shards"], rank=1, world_size=2, micro_batch=4, train=True,
                       num_workers=1)  # the iterator's generator seed is hashed to 63 bits: no overflow
    assert len(next(iter(big))["keys"]) == 4


def test_one_rank_two_workers_streams_like_two_ranks_one_worker(demo):
    """The streams are a function of the slot (rank * workers + worker), so a 1-rank run with
    accumulation over 2 workers sees exactly the global batches of a 2-rank run (the trainer's
    1-rank == 2-rank test relies on it)."""
    cfg = cfg_with()
    one = build_loader(cfg, demo["shards"], rank=0, world_size=1, micro_batch=4, train=True, num_workers=2)
    two = [build_loader(cfg, demo["shards"], rank=r, world_size=2, micro_batch=4, train=True, num_workers=0)
           for r in range(2)]
    for loader in (one, *two):
        loader.set_epoch(3)
    one_batches, r0, r1 = run(one), run(two[0]), run(two[1])
    interleaved = [b for pair in zip(r0, r1) for b in pair]  # batch b of a 1-rank run = worker b % 2
    assert same_batches(one_batches, interleaved)


def test_per_sample_choice_does_not_depend_on_the_stream(demo):
    """Caption vs question is seeded by (seed, epoch, key): the same under any world size / worker count."""
    cfg = cfg_with()
    one = run(build_loader(cfg, demo["shards"], rank=0, world_size=1, micro_batch=8, train=True, num_workers=0))
    three = [run(build_loader(cfg, demo["shards"], rank=r, world_size=3, micro_batch=4, train=True, num_workers=0))
             for r in range(3)]

    def choices(batches):
        return {k: (kind, q, ids.tolist()) for b in batches
                for k, kind, q, ids, pad in zip(b["keys"], b["kinds"], b["questions"], b["input_ids"], b["is_pad"])
                if not pad}

    merged = {}
    for batches in three:
        merged.update(choices(batches))
    assert merged == choices(one) and len(merged) == N_TRAIN


def repack(demo: dict, out: Path, sizes: list[int], extra: dict[str, bytes] | None = None) -> str:
    """Write the demo samples into shards of the given sizes (+ extra members per sample) with a manifest."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(Path(demo["shards"]).glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(samples)
    out.mkdir(parents=True)
    entries, start = [], 0
    for i, n in enumerate(sizes):
        with TarWriter(out / f"part-{i:05d}.tar") as w:
            for key in keys[start : start + n]:
                for ext, data in sorted({**samples[key], **(extra or {})}.items()):
                    w.add(f"{key}.{ext}", data)
        entries.append({"name": f"part-{i:05d}.tar", "samples": n})
        start += n
    write_json_atomic(out / "manifest.json", {"split": "train", "shards": entries})
    return str(out / f"part-{{00000..{len(sizes) - 1:05d}}}.tar")


@pytest.mark.parametrize("sizes,world,workers,micro", [([5, 37, 2, 21], 3, 2, 4), ([10], 3, 2, 4), ([3], 2, 2, 2)])
def test_equal_batches_with_uneven_and_few_shards(demo, tmp_path, sizes, world, workers, micro):
    pattern = repack(demo, tmp_path / "uneven", sizes)
    cfg = cfg_with()
    loaders = [build_loader(cfg, pattern, rank=r, world_size=world, micro_batch=micro, train=True,
                            num_workers=workers) for r in range(world)]
    per_rank = [run(ld) for ld in loaders]
    assert {len(b) for b in per_rank} == {loaders[0].batches_per_epoch}  # same count on every rank
    real = [k for batches in per_rank for b in batches for k, p in zip(b["keys"], b["is_pad"]) if not p]
    assert len(real) == len(set(real)) == sum(sizes)  # every sample once, even with fewer shards than slots
    pads = sum(ld.stats["pad_samples"] for ld in loaders)
    assert pads == world * loaders[0].samples_per_epoch - sum(sizes) == sum(ld.stats["planned_pad_rank"] for ld in loaders)


def test_pickle_members_are_never_unpickled(demo, tmp_path):
    class Touch:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (Path.touch, (Path(self.path),))

    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Touch(armed)))
    assert armed.exists()  # the payload really does act when unpickled
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Touch(marker))
    pattern = repack(demo, tmp_path / "evil", [20, 20],
                     extra={"pyd": payload, "pickle": payload, "pth": payload, "npy": payload})
    batches = run(build_loader(cfg_with(), pattern, rank=0, world_size=1, micro_batch=4, train=False, num_workers=2))
    assert sum(len(b["keys"]) for b in batches) == 40 and not marker.exists()


def test_eval_order_is_unshuffled_and_resampled_mode_is_endless_and_resumable(demo):
    ev = run(build_loader(cfg_with(), demo["shards"], rank=0, world_size=1, micro_batch=8, train=False, num_workers=0))
    assert flat(ev, "keys") == sorted(flat(ev, "keys"))
    cfg = cfg_with("data.resampled=true")
    loader = build_loader(cfg, demo["shards"], rank=0, world_size=2, micro_batch=4, train=True, num_workers=2)
    bpe = loader.batches_per_epoch
    loader.set_epoch(0)
    stream = list(islice(iter(loader), 2 * bpe + 3))  # runs past the end of virtual epoch 0 and 1
    assert not any(b["is_pad"].any() for b in stream)
    for k in (bpe + 2, bpe + 3):  # into the second virtual epoch, resuming on either worker
        loader.set_epoch(0, skip_batches=k)
        assert same_batches(list(islice(iter(loader), 2 * bpe + 3 - k)), stream[k:])
    loader.set_epoch(1)
    assert same_batches(list(islice(iter(loader), 3)), stream[bpe : bpe + 3])


def test_clear_errors(demo, tmp_path):
    cfg = cfg_with()
    with pytest.raises(ShardSpecError, match="matches no files.*shard-coco"):
        build_loader(cfg, str(tmp_path / "nothing-{00000..00003}.tar"), rank=0, world_size=1, micro_batch=2, train=True)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ShardSpecError, match="no manifest.json in .*shard-coco"):
        build_loader(cfg, str(tmp_path / "bare"), rank=0, world_size=1, micro_batch=2, train=True)
    pattern = repack(demo, tmp_path / "short", [6, 6])
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = 9  # the tar holds 6
    (tmp_path / "short" / "manifest.json").write_text(json.dumps(manifest))
    loader = build_loader(cfg, pattern, rank=0, world_size=1, micro_batch=3, train=False, num_workers=0)
    with pytest.raises(ShardMismatchError, match="part-00001.tar ended after 6 samples"):
        run(loader)
    with pytest.raises(ValueError, match="skip_batches=99"):
        loader.set_epoch(0, skip_batches=99)


def photo_jpeg(w: int, h: int, seed: int) -> bytes:
    """A smooth, textured RGB JPEG (gradients + noise), photo-like enough for resampling to matter."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_image_path_matches_open_clip_transform():
    """ImageToTensor (one box resize, uint8, normalised as a batch) gives open_clip's eval transform of
    the same draft-decoded image: exactly for portrait, square, small and unresized images, and but for
    a level of rounding in < 0.1 % of the values for landscape downscales; collate's batched
    normalisation is bit-identical to the per-image one."""
    from vlm_dist.data.images import decode_rgb
    from vlm_dist.data.samples import ImageToTensor, normalize_images

    itt = ImageToTensor(32)
    level = 1 / 255 / itt.std.min().item()  # one uint8 level, normalised (the largest of the 3 channels)
    for i, (w, h) in enumerate([(80, 60), (60, 80), (64, 64), (20, 30), (32, 48), (48, 32), (200, 60), (33, 47)]):
        raw = photo_jpeg(w, h, i)
        ref = itt.transform(decode_rgb(raw, 32))  # (3, 32, 32) float32, torchvision on the PIL image
        got = itt(raw)
        assert got.shape == ref.shape == (3, 32, 32) and got.dtype == torch.float32
        diff = (got - ref).abs()
        if w > h and min(w, h) > 32:  # landscape downscale: the box path
            assert diff.max() <= 2.01 * level and (diff > 0).float().mean() < 1e-3, (w, h)
        else:
            assert torch.equal(got, ref), (w, h)
    raws = [photo_jpeg(80, 60, k) for k in range(3)]
    stacked = normalize_images(torch.stack([itt.pixels(r) for r in raws]), 32)  # collate + the trainer
    assert torch.equal(stacked, torch.stack([itt(r) for r in raws])) and stacked.is_contiguous()


def test_normalize_refuses_float_images():
    """Only uint8 pixels are normalised: a float batch (already the model's input) would otherwise be
    divided by 255 a second time without any error."""
    from vlm_dist.data.samples import normalize_images

    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    once = normalize_images(pixels, 32)
    assert once.dtype == torch.float32 and once.abs().max() > 0.5
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(once, 32)


def test_dialogue_samples_keep_the_first_turn_and_add_other_pairs_of_the_image(demo):
    """data.qa_turns=3: a question sample becomes a dialogue. Its first turn is the qa_turns=1 sample's
    sequence, token for token (the same question is drawn), each later turn is another question of the
    same image with its own answer, and the loss covers exactly the answers and their end tokens."""
    tok = get_tokenizer()

    def rows(turns: int) -> dict:
        cfg = cfg_with("data.max_text_len=40", "model.max_seq_len=56", f"data.qa_turns={turns}")
        loader = build_loader(cfg, demo["shards"], rank=0, world_size=1, micro_batch=8, train=True, num_workers=0)
        return {k: (iid, kind, q, ids.tolist(), t[0].tolist()) for b in run(loader)
                for k, iid, kind, q, ids, t, pad in zip(b["keys"], b["image_ids"], b["kinds"], b["questions"],
                                                        b["input_ids"], b["targets"], b["is_pad"]) if not pad}

    def sequence(ids: list[int], labels: list[int]) -> list[int]:
        """The sample's tokens up to its last target (the inputs, then that target: the final <eot>)."""
        last = max(j for j, t in enumerate(labels) if t != IGNORE_INDEX)
        return ids[: last + 1] + [labels[last]]

    one, three = rows(1), rows(3)
    assert one.keys() == three.keys() and len(one) == N_TRAIN
    turns_per_sample = []
    for key, (iid, kind, q, ids, labels) in three.items():
        _, kind1, q1, ids1, labels1 = one[key]
        assert (kind, q) == (kind1, q1)
        if kind == "caption":
            assert (ids, labels) == (ids1, labels1)
            continue
        seq, first = sequence(ids, labels), sequence(ids1, labels1)
        assert seq[: len(first)] == first  # the one-question sample is the dialogue's first turn
        assert seq[0] == tok.bos_id and seq[-1] == tok.eos_id
        cuts = [0] + [j + 1 for j, t in enumerate(seq) if t == tok.eos_id]
        turns = [[t for t in seq[a:b] if t != tok.bos_id] for a, b in zip(cuts, cuts[1:])]
        asked = []
        for turn in turns:  # each is "question: Q answer: A <eot>" for one of this image's pairs
            match = [qq for qq, a in demo["qa"][iid].items()
                     if turn == tok.encode(f"question: {qq} answer:") + tok.encode(a) + [tok.eos_id]]
            assert len(match) == 1, tok.decode(turn)
            asked.append(match[0])
        assert asked[0] == q and len(set(asked)) == len(asked) <= 3
        answers = [x for qq in asked for x in tok.encode(demo["qa"][iid][qq]) + [tok.eos_id]]
        assert [t for t in labels if t != IGNORE_INDEX] == answers  # answers and <eot>s, no prompt
        turns_per_sample.append(len(turns))
    assert sorted(set(turns_per_sample)) == [2, 3]  # 40 tokens hold two turns, and three short ones


def test_an_image_that_does_not_decode_trains_nothing_and_a_cut_tar_is_named(demo, tmp_path, capfd):
    """A .jpg member that is not an image (an img2dataset download that got an error page) keeps its place in
    its batch, so every rank's batches stay as planned, as padding whose targets are all masked (no loss, no
    gradient, not in validation), and the loader names it. A tar cut short is an error naming the shard."""
    cfg = cfg_with()
    pattern = repack(demo, tmp_path / "bad", [6, 6])
    part = tmp_path / "bad" / "part-00000.tar"
    with tarfile.open(part) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = sorted({name.split(".")[0] for name, _ in members})[2]
    with TarWriter(part) as w:
        for name, data in members:
            w.add(name, b"<html>404 Not Found</html>" if name == f"{victim}.jpg" else data)
    loader = build_loader(cfg, pattern, rank=0, world_size=1, micro_batch=3, train=True, num_workers=0)
    batches = run(loader)
    assert len(batches) == loader.batches_per_epoch == 4
    [(b, row)] = [(b, row) for b in batches for row, key in enumerate(b["keys"]) if key == victim]
    assert b["is_pad"][row] and (b["targets"][row] == IGNORE_INDEX).all() and (b["images"][row] == 0).all()
    assert [bad[0] for bad in b["bad"]] == [victim] and "UnidentifiedImageError" in b["bad"][0][2]
    others = [r for r in range(len(b["keys"])) if r != row]
    assert all((b["targets"][r] != IGNORE_INDEX).any() for r in others)  # only that sample is masked
    assert loader.stats["bad_images"] == 1
    err = capfd.readouterr().err
    assert f"sample '{victim}' in {part}: its image does not decode (UnidentifiedImageError" in err and "BytesIO" not in err
    cut = tmp_path / "bad" / "part-00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(ShardMismatchError, match=r"part-00001.tar is damaged after \d+ usable samples .*rerun shard-coco"):
        run(loader)
