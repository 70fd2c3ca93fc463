"""Export == engine: for ZeRO-1/2/3 checkpoints written by 1 and 2 ranks, the export equals the
engine's fp32 weights and DeepSpeed's own zero_to_fp32.py output, and gives the engine's logits
(tests/scripts/export_check.py does the per-rank work). Plus the loader's and exporter's errors."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port, train_env
from vlm_dist.infer.export import export
from vlm_dist.infer.load import ExportError, load_exported


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_export_equals_engine_and_zero_to_fp32(tmp_path, world):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "tests/scripts/export_check.py", str(tmp_path), "1", "2", "3", "2bf16"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    results = [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]
    assert [r["stage"] for r in results] == ["1", "2", "3", "2bf16"]
    for r in results:
        assert r["world"] == world and r["n_frozen"] > 0
        assert r["max_weight_diff"] == 0.0, r  # exact: the same fp32 master weights
        assert r["max_script_diff"] == 0.0, r
        assert r["tied"], r
    for r in results[:3]:  # fp32: the module computes with the master weights themselves
        assert r["max_logit_diff"] <= 1e-5, r
    # bf16: the master weights, not the module's bf16 copies (rounded: no trained tensor equals its fp32 master)
    assert results[3]["module_weights"] > 0 and results[3]["equal_to_module"] == 0, results[3]
    # DeepSpeed's converter drops frozen parameters under ZeRO-1 (we take them from the module states)
    assert results[0]["script_keys_missing"] and all(k.startswith("vision.") for k in results[0]["script_keys_missing"])
    assert results[1]["script_keys_missing"] == results[2]["script_keys_missing"] == []


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(ExportError, match="is not a directory"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ExportError, match="no `latest` file"):
        export(tmp_path / "ckpt", tmp_path / "out")
    with pytest.raises(ExportError, match="no checkpoint tag 'best'"):
        export(tmp_path / "ckpt", tmp_path / "out", tag="best")
    (tmp_path / "ckpt" / "step1").mkdir()  # a save cut short: its checkpoint.json lists a file that is not there
    (tmp_path / "ckpt" / "step1" / "checkpoint.json").write_text(json.dumps(
        {"tag": "step1", "state": {}, "shape": {}, "world_size": 1, "files": {"mp_rank_00_model_states.pt": 5}}))
    with pytest.raises(ExportError, match=r"step1 is not a complete checkpoint: mp_rank_00_model_states.pt is missing"):
        export(tmp_path / "ckpt", tmp_path / "out", tag="step1")


def test_load_rejects_non_export_directories(tmp_path):
    with pytest.raises(ExportError, match="missing does not exist"):
        load_exported(tmp_path / "missing")
    with pytest.raises(ExportError, match="is not a vlm-dist export"):
        load_exported(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a training run's folder
    with pytest.raises(ExportError, match=r"is a training run, not an export: `vlm-dist export --ckpt .*run/checkpoints --out .*run/export`"):
        load_exported(tmp_path / "run")
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="format 'something-else'"):
        load_exported(tmp_path)


def test_load_names_damaged_or_mismatched_export_files(tmp_path):
    """Both files present but damaged, or from different exports: one ExportError naming the file, not a
    JSONDecodeError, KeyError, SafetensorError or size-mismatch RuntimeError."""
    import shutil

    from vlm_dist.config import load_config
    from vlm_dist.infer.export import save_export
    from vlm_dist.model import VLM

    good = tmp_path / "good"
    save_export(VLM(load_config("tiny").model).eval(), good)
    meta = json.loads((good / "config.json").read_text())

    def damaged(name, config=None, weights=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if config is not None:
            (d / "config.json").write_text(config)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        return d

    size = (good / "model.safetensors").stat().st_size
    cases = {"not valid JSON": damaged("json", config="{"),
             "has no \"model\" section": damaged("nomodel", config=json.dumps({k: v for k, v in meta.items() if k != "model"})),
             "cannot be read": damaged("cut", weights=(good / "model.safetensors").read_bytes()[: size // 2]),
             "does not hold the weights its config.json describes": damaged("other", config=json.dumps(
                 {**meta, "model": {**meta["model"], "d_model": 2 * meta["model"]["d_model"]}}))}
    for message, folder in cases.items():
        with pytest.raises(ExportError, match=message):
            load_exported(folder)


def test_export_directory_loads_without_deepspeed(tmp_path):
    import torch

    from vlm_dist.config import load_config
    from vlm_dist.infer.export import save_export
    from vlm_dist.model import VLM

    torch.manual_seed(0)
    model = VLM(load_config("tiny").model).eval()
    save_export(model, tmp_path / "exp")  # verifies itself by a strict reload
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 6))
    torch.save({"images": images, "ids": ids, "logits": model(images, ids)["logits"]}, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        "from vlm_dist.infer.load import load_exported\n"
        f"m, _ = load_exported({str(tmp_path / 'exp')!r})\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "assert torch.equal(m(ref['images'], ref['ids'])['logits'], ref['logits'])\n"
        "assert m.lm_head.weight is m.tok_emb.weight\n"
        "assert 'deepspeed' not in sys.modules, 'loading an export imported deepspeed'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_an_export_of_a_compiled_model_loads_eager(tmp_path):
    """model.compile is a training setting: an export of a model trained with it (the `base` preset's) loads
    for generation and evaluation without compiled regions, with the weights and the rest of its config."""
    import torch

    from vlm_dist.config import load_config
    from vlm_dist.infer.export import save_export
    from vlm_dist.model import VLM

    torch.manual_seed(0)
    model = VLM(load_config("tiny", ["model.compile=true"]).model).eval()
    save_export(model, tmp_path / "exp")
    loaded, cfg = load_exported(tmp_path / "exp")
    assert cfg.compile is False and cfg.n_layers == model.cfg.n_layers
    assert not loaded.vision.compiled and not loaded.lm_head.fused
    assert not any(b.compiled for b in [*loaded.blocks, *loaded.extra_heads.blocks])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
