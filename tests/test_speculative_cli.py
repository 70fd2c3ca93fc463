"""`generate --speculative` and `eval --speculative`: same text as greedy, stats reported; with --temperature, speculative sampling."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import demo_export
from vlm_dist.cli import app
from vlm_dist.config import load_config
from vlm_dist.infer.export import save_export
from vlm_dist.model import VLM

runner = CliRunner()


@pytest.fixture(scope="module")
def export_and_shards(module_dir):
    return demo_export(module_dir("spec_cli"), ("model.n_future=3",))


def test_generate_speculative_batch_matches_greedy_and_reports(export_and_shards):
    root, _ = export_and_shards
    images = sorted((root / "data" / "images" / "val2017").glob("*.jpg"))[:3]
    args = ["generate", "--model", str(root / "export"), "--max-new-tokens", "7", "--json"]
    for im in images:
        args += ["--image", str(im)]
    greedy = runner.invoke(app, args)
    spec = runner.invoke(app, [*args, "--speculative"])
    assert greedy.exit_code == 0 and spec.exit_code == 0, greedy.output + spec.output
    texts = lambda out: [json.loads(line)["text"] for line in out.splitlines() if line.startswith("{")]  # noqa: E731
    assert texts(spec.stdout) == texts(greedy.stdout) and len(texts(greedy.stdout)) == 3
    assert "tokens per model call" in spec.stderr and "accepted per draft position: 100%" in spec.stderr
    assert "tokens/s" in spec.stderr


def test_speculative_sampling_samples_with_its_seed(export_and_shards):
    """--speculative with --temperature: speculative sampling (its distribution is tested in
    tests/test_spec_sampling.py); the same seed gives the same text, and the stats line is printed."""
    root, _ = export_and_shards
    image = next((root / "data" / "images" / "val2017").glob("*.jpg"))
    args = ["generate", "--model", str(root / "export"), "--image", str(image), "--image", str(image),
            "--speculative", "--temperature", "0.7", "--max-new-tokens", "6", "--json"]
    first, again = runner.invoke(app, [*args, "--seed", "4"]), runner.invoke(app, [*args, "--seed", "4"])
    assert first.exit_code == 0 and again.exit_code == 0, first.output
    assert first.stdout == again.stdout and first.stdout.count("{") == 2
    other = runner.invoke(app, [*args, "--seed", "5"])  # a random model spreads its mass: another seed, other text
    assert other.exit_code == 0 and other.stdout != first.stdout
    assert "tokens per model call" in first.stderr


def test_eval_speculative_reports_stats_and_same_predictions(export_and_shards, tmp_path):
    root, shards = export_and_shards
    base = ["eval", "--model", str(root / "export"), "--shards", str(shards / "val"), "--batch-size", "4"]
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "a.json")])
    spec = runner.invoke(app, [*base, "--out", str(tmp_path / "b.json"), "--speculative"])
    assert plain.exit_code == 0 and spec.exit_code == 0, plain.output + spec.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]
    s = b["metrics"]["speculative"]
    assert len(s["accepted_per_position"]) == 3 and s["tokens"] > 0 and "tokens per model call" in spec.output


def test_speculative_on_a_model_without_extra_heads_says_so(export_and_shards, tmp_path):
    root, _ = export_and_shards
    torch.manual_seed(0)
    save_export(VLM(load_config("tiny", ["model.n_future=1"]).model).eval(), tmp_path / "export1")
    image = sorted((root / "data" / "images" / "val2017").glob("*.jpg"))[0]
    args = ["generate", "--model", str(tmp_path / "export1"), "--image", str(image), "--max-new-tokens", "5", "--json"]
    greedy, spec = runner.invoke(app, args), runner.invoke(app, [*args, "--speculative"])
    assert spec.exit_code == 0 and greedy.exit_code == 0, spec.output
    assert "no multi-token heads" in spec.stderr and "no multi-token heads" not in greedy.stderr
    assert spec.stdout == greedy.stdout  # still greedy's text
    with_heads = runner.invoke(app, ["generate", "--model", str(root / "export"), "--image", str(image),
                                     "--max-new-tokens", "5", "--speculative"])
    assert with_heads.exit_code == 0 and "no multi-token heads" not in with_heads.stderr


def test_static_steps_follow_the_flag_and_the_device_default(export_and_shards, monkeypatch, tmp_path):
    """--static / --dynamic pick the decoding steps (same text either way); without either, the device decides:
    dynamic on this CPU, static where static_default says a GPU (patched here to stand for one)."""
    import vlm_dist.infer.generate as gen_mod
    import vlm_dist.infer.speculative as spec_mod
    from vlm_dist.infer.static import StaticSteps

    built = []
    init = StaticSteps.__init__
    monkeypatch.setattr(StaticSteps, "__init__", lambda self, *a: (built.append(1), init(self, *a))[1])
    root, shards = export_and_shards
    images = sorted((root / "data" / "images" / "val2017").glob("*.jpg"))[:2]
    args = ["generate", "--model", str(root / "export"), "--max-new-tokens", "7", "--json",
            "--image", str(images[0]), "--image", str(images[1])]

    def texts(*extra) -> tuple[list[str], int]:
        built.clear()
        res = runner.invoke(app, [*args, *extra])
        assert res.exit_code == 0, res.output
        return [json.loads(line)["text"] for line in res.stdout.splitlines() if line.startswith("{")], len(built)

    want, n = texts()
    assert n == 0 and len(want) == 2  # the CPU default: dynamic steps
    assert texts("--static") == (want, 1) and texts("--static", "--speculative") == (want, 1)
    assert texts("--dynamic", "--speculative") == (want, 0)
    for mod in (gen_mod, spec_mod):  # as on a GPU
        monkeypatch.setattr(mod, "static_default", lambda device: True)
    assert texts() == (want, 1) and texts("--speculative") == (want, 1)
    assert texts("--dynamic") == (want, 0)
    sampled = runner.invoke(app, [*args, "--temperature", "0.7"])  # sampling never takes the static steps
    assert sampled.exit_code == 0 and not built, sampled.output
    refused = runner.invoke(app, [*args, "--static", "--temperature", "0.7"])
    assert refused.exit_code == 2 and "drop --static" in refused.output
    base = ["eval", "--model", str(root / "export"), "--shards", str(shards / "val"), "--batch-size", "4"]
    built.clear()
    dyn = runner.invoke(app, [*base, "--out", str(tmp_path / "d.json"), "--dynamic"])
    assert dyn.exit_code == 0 and not built, dyn.output
    sta = runner.invoke(app, [*base, "--out", str(tmp_path / "s.json")])
    assert sta.exit_code == 0 and built, sta.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("d.json", "s.json"))
    assert [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]


def test_device_flag_picks_where_to_decode_and_refuses_what_torch_cannot_use(export_and_shards, monkeypatch):
    """--device auto decodes on the GPU when torch sees one (the CLI once decoded on the CPU beside an idle H200),
    else on the CPU; a device torch cannot use is a clear error, not a crash inside a kernel."""
    from vlm_dist.devices import pick_device

    root, _ = export_and_shards
    image = next((root / "data" / "images" / "val2017").glob("*.jpg"))
    args = ["generate", "--model", str(root / "export"), "--image", str(image), "--max-new-tokens", "5", "--json"]
    auto, cpu = runner.invoke(app, args), runner.invoke(app, [*args, "--device", "cpu"])
    assert auto.exit_code == 0 and cpu.stdout == auto.stdout, auto.output + cpu.output
    for bad, says in [("cuda:3", "CUDA GPU(s)"), ("mps", "--device 'mps': use auto, cpu, cuda or cuda:N"),
                      ("gpu!", "not a device")]:
        res = runner.invoke(app, [*args, "--device", bad])
        assert res.exit_code == 2 and says in res.output, (bad, res.output)
    assert pick_device("auto") == torch.device("cpu") == pick_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")

    import vlm_dist.infer.load as load_mod

    asked = []
    real = load_mod.load_exported
    monkeypatch.setattr(load_mod, "load_exported", lambda d, device="cpu", **kw: (asked.append(device), real(d, **kw))[1])
    for command in (args, ["eval", "--model", str(root / "export"), "--shards", str(root / "data" / "shards" / "val"),
                           "--out", str(root / "e.json"), "--limit", "1"]):
        asked.clear()
        runner.invoke(app, command)  # the model loads on the CPU (the stand-in ignores the device); decoding runs
        assert asked == [torch.device("cuda")], asked  # what the CLI asked for on a "GPU machine": the GPU


def test_dtype_flag_decodes_in_the_asked_precision(export_and_shards, tmp_path, monkeypatch):
    """--dtype fp32 (default) decodes any export, fp32- or bf16-stored, in fp32; bf16 in bf16, with a note only
    where the hardware has no native bf16; anything else is a clear error."""
    import vlm_dist.infer.load as load_mod
    import vlm_dist.train.dsconfig as dsconfig

    root, _ = export_and_shards
    torch.manual_seed(1)
    save_export(VLM(load_config("tiny", ["model.n_future=3"]).model).eval().to(torch.bfloat16), tmp_path / "bf16_export")
    image = next((root / "data" / "images" / "val2017").glob("*.jpg"))
    decoded_in = []
    real = load_mod.load_exported

    def spy(d, device="cpu", dtype=None):
        model, cfg = real(d, device=device, dtype=dtype)
        decoded_in.append(model.lm_head.weight.dtype)
        return model, cfg

    monkeypatch.setattr(load_mod, "load_exported", spy)
    monkeypatch.setattr(dsconfig, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # a CPU with native bf16
    for export in (root / "export", tmp_path / "bf16_export"):
        args = ["generate", "--model", str(export), "--image", str(image), "--max-new-tokens", "5", "--json", "--speculative"]
        for flag, held in [([], torch.float32), (["--dtype", "fp32"], torch.float32), (["--dtype", "bf16"], torch.bfloat16)]:
            decoded_in.clear()
            res = runner.invoke(app, [*args, *flag])
            assert res.exit_code == 0 and decoded_in == [held], (export.name, flag, decoded_in, res.output)
            assert "tokens per model call" in res.stderr and "note: --dtype" not in res.stderr
    monkeypatch.setattr(dsconfig, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU
    evaluate = ["eval", "--model", str(root / "export"), "--shards", str(root / "data" / "shards" / "val"),
                "--out", str(tmp_path / "e16.json"), "--limit", "2"]
    decoded_in.clear()
    res = runner.invoke(app, [*evaluate, "--dtype", "bf16"])
    assert res.exit_code == 0 and decoded_in == [torch.bfloat16], res.output
    assert "note: --dtype bf16 here" in res.stderr and "emulated" in res.stderr, res.output
    res = runner.invoke(app, [*evaluate, "--dtype", "fp16"])
    assert res.exit_code == 2 and "--dtype 'fp16': use fp32 or bf16" in res.output, res.output
