"""The checkpoint protocol on disk, with a stand-in engine (no DeepSpeed, one process): publish by
rename, completeness, recovery of every interrupted state, the choice of `--resume auto`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_dist.train import checkpoint as ckpt


class FileEngine:
    """Writes one model file and one optimizer shard, as a 1-rank DeepSpeed engine would."""
    rank = 0

    def __init__(self, payload: float = 1.0):
        self.payload = payload

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((4,), self.payload), **client_state}, ckpt_dir / tag / "mp_rank_00_model_states.pt")
        torch.save({"m": torch.zeros(4)}, ckpt_dir / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load(self, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
        return torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)


def save(root: Path, tag: str, step: int, payload: float = 1.0, latest: bool = True) -> None:
    ckpt.save(FileEngine(payload), root, tag, ckpt.TrainState(step=step), {"c": 1}, {"world_size": 1}, 1, latest)


def test_save_publishes_a_complete_tag(tmp_path):
    save(tmp_path, "step2", 2)
    tag = tmp_path / "step2"
    meta = ckpt.read_meta(tag)
    assert ckpt.incomplete_reason(tag) is None and meta["state"]["step"] == 2 and meta["world_size"] == 1
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "rng_rank0.pt", "run_config.json"}
    assert (tmp_path / "latest").read_text() == "step2"
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_best_is_replaced_whole(tmp_path):
    save(tmp_path, "best", 3, payload=1.0, latest=False)
    save(tmp_path, "best", 6, payload=2.0, latest=False)
    assert ckpt.read_meta(tmp_path / "best")["state"]["step"] == 6
    assert torch.equal(FileEngine().load(tmp_path, "best")["w"], torch.full((4,), 2.0))
    assert not (tmp_path / "latest").exists()  # best is never `latest`


def test_incomplete_reasons(tmp_path):
    save(tmp_path, "step2", 2)
    tag = tmp_path / "step2"
    (tag / "rng_rank0.pt").write_bytes(b"x")
    assert "rng_rank0.pt has 1 bytes" in ckpt.incomplete_reason(tag)
    (tag / "rng_rank0.pt").unlink()
    assert ckpt.incomplete_reason(tag) == "rng_rank0.pt is missing"
    (tag / ckpt.META_FILE).unlink()
    assert "no readable checkpoint.json" in ckpt.incomplete_reason(tag)


def test_recover_every_interrupted_state(tmp_path):
    save(tmp_path, "step2", 2)
    save(tmp_path, "best", 2, payload=1.0, latest=False)
    # an interrupted save (no checkpoint.json yet), a complete but unpublished one, a half-swapped best
    save(tmp_path, "step4", 4)
    (tmp_path / "step4").rename(tmp_path / ".tmp-step4")
    (tmp_path / ".tmp-step4" / ckpt.META_FILE).unlink()
    save(tmp_path, "step6", 6)
    (tmp_path / "step6").rename(tmp_path / ".tmp-step6")
    (tmp_path / "latest").write_text("step2")
    save(tmp_path, "new-best", 5, payload=3.0, latest=False)
    (tmp_path / "best").rename(tmp_path / ".old-best")
    (tmp_path / "new-best").rename(tmp_path / ".tmp-best")
    notes = ckpt.recover(tmp_path)
    assert "removed .tmp-step4: an interrupted save" in notes
    assert any(n.startswith("published step6") for n in notes) and any(n.startswith("published best") for n in notes)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["best", "step2", "step6"]
    assert torch.equal(FileEngine().load(tmp_path, "best")["w"], torch.full((4,), 3.0))
    assert (tmp_path / "latest").read_text() == "step6"
    # an interrupted swap whose new best was NOT complete: the old best comes back
    (tmp_path / "best").rename(tmp_path / ".old-best")
    assert ckpt.recover(tmp_path) == ["restored best: its replacement was interrupted"]
    assert ckpt.read_meta(tmp_path / "best")["state"]["step"] == 5


def test_resume_auto_takes_the_newest_complete_and_says_what_it_skipped(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path / "none-yet") is None
    save(tmp_path, "step2", 2)
    save(tmp_path, "epoch0", 4)
    save(tmp_path, "step6", 6)
    (tmp_path / "step6" / "rng_rank0.pt").unlink()
    where = ckpt.resolve_resume("auto", tmp_path)
    assert where.tag == "epoch0" and where.meta["state"]["step"] == 4
    assert where.skipped == ("step6: rng_rank0.pt is missing",)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint: rng_rank0.pt is missing"):
        ckpt.resolve_resume(str(tmp_path / "step6"), tmp_path)
    assert ckpt.resolve_resume(str(tmp_path / "step2"), tmp_path).tag == "step2"
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_resume_refuses_a_folder_with_only_incomplete_tags(tmp_path):
    save(tmp_path, "step2", 2)
    (tmp_path / "step2" / ckpt.META_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"no complete checkpoint .* \(skipped step2: no readable"):
        ckpt.resolve_resume("auto", tmp_path)


def test_a_rollback_sets_later_tags_aside(tmp_path):
    for s in (2, 4, 6):
        save(tmp_path, f"step{s}", s)
    save(tmp_path, "best", 5, latest=False)
    assert ckpt.set_aside(tmp_path, 2) == ["best", "step4", "step6"]
    assert ckpt.resolve_resume("auto", tmp_path).tag == "step2" and (tmp_path / "latest").read_text() == "step2"
    (aside,) = tmp_path.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["best", "step4", "step6"]  # kept, out of the way
    assert ckpt.set_aside(tmp_path, -1) == ["step2"] and ckpt.resolve_resume("auto", tmp_path) is None
    assert len(list(tmp_path.glob("superseded-*"))) == 2


def test_a_fresh_start_sets_aside_an_old_runs_interrupted_saves_too(tmp_path):
    """`--resume none` with leftovers of the old run's interrupted saves (step4 complete but unpublished, best
    mid-replacement): they go aside with its published tags, so that a later `--resume auto` (after the new
    run saved step2 and crashed) continues the new run, not the old one's step4."""
    from vlm_dist.observe.logger import NullLogger
    from vlm_dist.train.dist import DistInfo
    from vlm_dist.train.setup import RunOptions, _resume_point

    save(tmp_path, "step2", 2)
    save(tmp_path, "step4", 4)
    (tmp_path / "step4").rename(tmp_path / ".tmp-step4")  # killed between its last file and publishing
    save(tmp_path, "best", 3, latest=False)
    (tmp_path / "best").rename(tmp_path / ".old-best")  # killed while a new best replaced it
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert _resume_point(RunOptions(resume="none"), tmp_path, info, NullLogger()) is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("superseded-")] == []
    save(tmp_path, "step2", 2, payload=2.0)  # the new run, then a crash
    assert _resume_point(RunOptions(resume="auto"), tmp_path, info, NullLogger()).tag == "step2"
    assert FileEngine().load(tmp_path, "step2")["w"][0].item() == 2.0
    (aside,) = tmp_path.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["best", "step2", "step4"]  # the old run's, kept


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")])
def test_a_save_that_cannot_write_is_a_checkpoint_error_and_keeps_the_published_tags(tmp_path, error):
    """A full disk mid-save (torch.save raises RuntimeError there, file writes OSError): a CheckpointError (the
    trainer's one-line exit 2) naming the tag, the folder, the cause and the free space; step2 and `latest` stand."""
    class FullDisk(FileEngine):
        def save(self, ckpt_dir, tag, client_state):
            (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
            raise error

    save(tmp_path, "step2", 2)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint step4 into .*\.tmp-step4: .*GiB free there"):
        ckpt.save(FullDisk(), tmp_path, "step4", ckpt.TrainState(step=4), {"c": 1}, {"world_size": 1}, 1)
    assert ckpt.resolve_resume("auto", tmp_path).tag == "step2" and (tmp_path / "latest").read_text() == "step2"


def test_prune_keeps_the_newest_step_and_epoch_tags(tmp_path):
    for s in (2, 4, 6):
        save(tmp_path, f"step{s}", s)
    for e in (1, 2, 10):  # numeric order, not the names': epoch10 is the newest
        save(tmp_path, f"epoch{e}", 3 * e)
    assert ckpt.prune_checkpoints(tmp_path, 2, True) == ["step2"]  # keep_epochs None: every epoch kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["epoch1", "epoch10", "epoch2", "step4", "step6"]
    assert ckpt.prune_checkpoints(tmp_path, 2, True, keep_epochs=2) == ["epoch1"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["epoch10", "epoch2", "step4", "step6"]


def test_write_atomic_replaces(tmp_path):
    ckpt.write_atomic(tmp_path / "latest", "step2")
    ckpt.write_atomic(tmp_path / "latest", "step4")
    assert (tmp_path / "latest").read_text() == "step4" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_truncate_drops_a_line_a_crash_cut(tmp_path):
    from vlm_dist.observe.logger import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    assert truncate_jsonl(log, 2) == 2
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
