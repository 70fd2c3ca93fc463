"""The memory-saving head loss (all heads' rows through one chunked linear-cross-entropy) equals the plain one:
every head's logits materialised at once, as the model computed it before issue 9."""

import pytest
import torch
import torch.nn.functional as F

from vlm_dist.config import load_config
from vlm_dist.model import VLM
from vlm_dist.model import loss as loss_module
from vlm_dist.text import IGNORE_INDEX


def plain_loss(model, images, input_ids, targets):
    """The reference: all heads' states, then all heads' (N, V) logits, then the weighted loss."""
    P = model.n_image_tokens
    h = model.trunk(model.embed(images, input_ids))
    states = [s[:, P:] for s in model.head_states(h)]
    per_sample = []
    for k, s in enumerate(states):
        t = targets[:, k]
        valid = t != IGNORE_INDEX
        ce = F.cross_entropy(model.lm_head(s[valid]).float(), t[valid], reduction="none")
        rows = valid.nonzero(as_tuple=True)[0]
        per_sample.append(torch.zeros(t.shape[0]).index_add(0, rows, ce) / valid.sum(1).clamp(min=1))
    weights = torch.tensor(model.cfg.head_weights)
    return (weights * torch.stack(per_sample, 1).mean(0)).sum()


def batch(n_future, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(0, 49408, (B, T + n_future), generator=g)
    targets = torch.stack([ids[:, 1 + k : 1 + k + T] for k in range(n_future)], 1).clone()
    targets[0, :, 8:] = IGNORE_INDEX  # a short sample
    targets[1, :, :3] = IGNORE_INDEX  # a prompt that is not scored
    return images, ids[:, :T], targets


@pytest.mark.parametrize("n_future,ckpt", [(2, True), (3, False), (4, True)])
def test_memory_saving_head_loss_equals_plain_loss_and_gradients(monkeypatch, n_future, ckpt):
    # chunks of 5 rows: every head's loss spans several checkpointed chunks (one has a ragged tail)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * 49408)
    torch.manual_seed(n_future)
    cfg = load_config("tiny", [f"model.n_future={n_future}", f"model.activation_checkpointing={str(ckpt).lower()}",
                               f"model.mtp_weights={[1.0] + [0.5] * (n_future - 1)}"]).model
    model = VLM(cfg).train()
    images, ids, targets = batch(n_future)
    out = model(images, ids, targets)
    out["loss"].backward()
    new = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = plain_loss(model, images, ids, targets)
    ref.backward()
    assert abs(out["loss"].item() - ref.item()) <= 1e-6
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert new.keys() == grads.keys() and len(grads) > 10
    worst = max((new[n] - grads[n]).abs().max().item() for n in grads)
    assert worst <= 1e-6, worst
    assert any(new[n].abs().max() > 1e-4 for n in grads)  # the gradients compared are not all zero


def test_loss_without_gradients_matches_and_sample_losses_are_per_head():
    torch.manual_seed(1)
    model = VLM(load_config("tiny", ["model.n_future=3"]).model).eval()
    images, ids, targets = batch(3, seed=2)
    with torch.no_grad():
        out = model(images, ids, targets)
        ref = plain_loss(model, images, ids, targets)
    assert abs(out["loss"].item() - ref.item()) <= 1e-6
    assert out["sample_losses"].shape == (3, 3) and torch.allclose(out["sample_losses"].mean(0), out["head_losses"])


@pytest.mark.slow
def test_memory_saving_head_loss_equals_plain_under_zero_2_and_3_on_two_ranks():
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, free_port, train_env

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "tests/scripts/head_loss_zero.py", "2", "3"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    results = [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]
    assert [r["stage"] for r in results] == [2, 3]
    for r in results:
        assert r["world"] == 2 and r["n_grads"] > 10 and r["grad_max"] > 1e-4, r
        assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6 and r["step2_loss_diff"] <= 1e-6, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 tensor-core gradient path runs on CUDA only "
                    "(tools/bench_gpu.py's device session runs this test there)")
def test_cuda_bf16_head_loss_gradients_are_as_accurate_as_autograds():
    """On CUDA with bf16 weights, dW comes from bf16 operands accumulated in fp32 (loss.accumulate_dw) in
    ~1360-row chunks. Against fp64 on the same bf16 inputs it must be at least as accurate as autograd's
    own bf16 nn.Linear + cross-entropy, for dx and dW."""
    from vlm_dist.model.loss import LinearCrossEntropy, chunk_rows

    torch.manual_seed(0)
    N, D, V = 3000, 768, 49408  # 3 chunks, the last one ragged
    dev = torch.device("cuda")
    xb = torch.randn(N, D, device=dev).bfloat16()
    wb = (torch.randn(V, D, device=dev) * 0.05).bfloat16()
    y = torch.randint(0, V, (N,), device=dev)
    rows = chunk_rows(dev, V)
    assert 1000 < rows < N

    def grads(x, w, fn):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(x, w).sum().backward()
        return x.grad, w.grad

    ref = grads(xb.double(), wb.double(), lambda x, w: F.cross_entropy(x @ w.T, y, reduction="none"))
    plain = grads(xb, wb, lambda x, w: F.cross_entropy((x @ w.T).float(), y, reduction="none"))

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for fused in (False, True):  # eager chunk kernels, and model.compile's compiled ones
        ours = grads(xb, wb, lambda x, w: LinearCrossEntropy.apply(x, w, y, rows, fused))
        for name, o, p, r in zip(("dx", "dW"), ours, plain, ref):
            assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
            assert rel(o, r) <= max(1.5 * rel(p, r), 1e-3) and rel(o, r) < 1e-2, (fused, name, rel(o, r), rel(p, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_give_the_recomputed_gradients_bit_for_bit(monkeypatch, dtype):
    """Small problems keep each chunk's logits from forward (KEEP_ELEMENTS) instead of recomputing them:
    the same GEMM on the same chunk, so loss and gradients are identical to the last bit, and a second
    backward through the same graph (retain_graph) recomputes and still agrees."""
    from vlm_dist.model.loss import LinearCrossEntropy

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * 49408)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(13, 32, generator=g).to(dtype)  # 3 chunks of 5 rows, the last ragged
    w0 = (torch.randn(49408, 32, generator=g) * 0.05).to(dtype)
    y = torch.randint(0, 49408, (13,), generator=g)
    scale = torch.rand(13, generator=g)  # a per-row incoming gradient, as the per-sample means give

    def run(keep: int, backwards: int = 1):
        monkeypatch.setattr(loss_module, "KEEP_ELEMENTS", keep)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        ce = LinearCrossEntropy.apply(x, w, y, 5)
        out = []
        for _ in range(backwards):
            x.grad = w.grad = None
            (ce * scale).sum().backward(retain_graph=True)
            out.append((ce.detach(), x.grad, w.grad))
        return out

    (recomputed,) = run(keep=0)
    kept, again = run(keep=1 << 30, backwards=2)
    for a, b, c in zip(recomputed, kept, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert recomputed[2].abs().max() > 0


def test_compiled_chunk_kernels_give_the_eager_loss_and_gradients(monkeypatch):
    """model.compile's head loss: the chunk kernels compiled (inductor's CPU backend here, triton on CUDA) give
    the eager loss and gradients in fp32 to float reassociation (1e-6 relative), over ragged chunks whose
    row counts differ (dynamic rows: one compiled graph), kept logits and recomputed ones alike."""
    from vlm_dist.model.loss import LinearCrossEntropy

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(23, 32, generator=g)
    w0 = torch.randn(3001, 32, generator=g) * 0.3
    y = torch.randint(0, 3001, (23,), generator=g)
    scale = torch.rand(23, generator=g)

    def run(fused: bool, keep: int):
        monkeypatch.setattr(loss_module, "KEEP_ELEMENTS", keep)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        ce = LinearCrossEntropy.apply(x, w, y, 9, fused)  # chunks of 9, 9 and 5 rows
        (ce * scale).sum().backward()
        return ce.detach(), x.grad, w.grad

    eager = run(False, 0)
    for keep in (0, 1 << 30):
        for a, b in zip(eager, run(True, keep)):
            assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (keep, (a - b).abs().max())
    assert eager[2].abs().max() > 1e-3
