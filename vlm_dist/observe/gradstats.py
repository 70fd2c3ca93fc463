"""Per-layer gradient statistics and weight/gradient histograms, correct under ZeRO 1, 2 and 3.

    obs = GradObserver(engine.module, cfg.log, gather_grad=deepspeed.utils.safe_get_full_grad,
                       gather_param=deepspeed.utils.safe_get_full_fp32_param)
    engine.backward(loss)                   # last micro-batch of the step (accumulation boundary)
    obs.before_step(step, log)              # EVERY rank: the gathers are collectives
    engine.step()
    obs.after_step(log)                     # EVERY rank: gathers the updated fp32 weights

Under ZeRO `param.grad` is not the gradient: stage 1/2 keep each rank's slice of the reduced
gradient in the optimizer's partition (and 0.19.8 clears `param.grad` at the end of backward for that
reason), stage 3 also partitions the parameter itself. DeepSpeed's `safe_get_full_grad` rebuilds the
full tensor (an all-reduce of zero-padded slices for stage 1/2, an all-gather for stage 3), so every
rank must call it, for the same parameters in the same order. Read after the last micro-batch's
backward and before `engine.step()`, it is the accumulated gradient of the step: the engine scales
each micro-batch's loss by 1/gradient_accumulation_steps and ZeRO averages over ranks, so it is the
gradient of the mean loss over the global batch, before clipping (clipping happens inside step) —
the same whatever the ranks × accumulation split. With fp16 it is also multiplied by the loss scale,
which `before_step` divides out. `safe_get_full_fp32_param` gathers the fp32 master weights the same
way; the update ratio ||W_after − W_before|| / ||W_before|| compares them across `engine.step()` (a
full fp32 copy of the trainable weights is held on every rank between the two calls).

Layers: `vision` (only when trained), `projector`, `embeddings` (token embedding = the tied LM head),
`lm_head` (if untied), `block{i}`, `norm` (head 0's final norm), `head{k}` (extra head k: block + norm).
Every trainable parameter belongs to exactly one layer, so the global norm is the root of the sum of
the squared layer norms. Only rank 0's logger writes; the others compute the same numbers and discard them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

Gather = Callable[[nn.Parameter], "torch.Tensor | None"]


def layer_of(name: str) -> str:
    """The layer a parameter name belongs to (module docstring lists the layers)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"block{parts[1]}"
    if parts[0] == "extra_heads":  # extra_heads.{blocks,norms}.k -> head k+1 (head 0 is the next-token head)
        return f"head{int(parts[2]) + 1}"
    return {"tok_emb": "embeddings"}.get(parts[0], parts[0])


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by layer, in the model's (rank-independent) order."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            groups.setdefault(layer_of(name), []).append(p)
    return groups


def sq_norm(t: torch.Tensor) -> float:
    """Sum of squares, accumulated in float64 (a float32 sum drifts by ~1e-5 over millions of entries)."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


def tensor_stats(tensors: list[torch.Tensor]) -> tuple[float, float, int]:
    """(sum of squares, max |x| over the finite entries, count of NaN/Inf) over tensors.
    A NaN/Inf makes the sum of squares (and so the norm) NaN/Inf; the max stays informative. The
    costly finiteness scan runs only when the sum says there is something to find."""
    sumsq, max_abs, bad = 0.0, 0.0, 0
    for t in tensors:
        t = t.detach()
        if t.numel() == 0:
            continue
        part = sq_norm(t)
        sumsq += part
        if not math.isfinite(part):
            finite = torch.isfinite(t)
            bad += int((~finite).sum())
            t = t[finite]
        if t.numel():
            lo, hi = torch.aminmax(t)
            max_abs = max(max_abs, -float(lo), float(hi))
    return sumsq, max_abs, bad


class GradObserver:
    def __init__(self, model: nn.Module, grad_stats_every: int, histograms_every: int,
                 gather_grad: Gather, gather_param: Gather) -> None:
        self.groups = layer_groups(model)
        self.stats_every, self.hist_every = grad_stats_every, histograms_every
        self.gather_grad, self.gather_param = gather_grad, gather_param
        self._before: tuple[int, dict[str, list[torch.Tensor]]] | None = None

    def due(self, step: int) -> tuple[bool, bool]:
        """(statistics due, histograms due) at optimizer step `step` (1-based, the step being taken)."""
        return (self.stats_every > 0 and step % self.stats_every == 0,
                self.hist_every > 0 and step % self.hist_every == 0)

    def _grads(self, params: list[nn.Parameter], loss_scale: float) -> list[torch.Tensor]:
        out = []
        for p in params:
            g = self.gather_grad(p)  # collective under ZeRO
            out.append(torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None
                       else g.float() / loss_scale)
        return out

    def _weights(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        out = []
        for p in params:
            w = self.gather_param(p)  # fp32 master weights; collective under ZeRO; None without ZeRO
            out.append((p.detach() if w is None else w).float().clone())
        return out

    def before_step(self, step: int, log, loss_scale: float = 1.0) -> None:
        """Call on every rank after the step's last backward, before engine.step()."""
        stats, hist = self.due(step)
        if not (stats or hist):
            return
        values: dict[str, float] = {}
        before: dict[str, list[torch.Tensor]] = {}
        total = 0.0
        for layer, params in self.groups.items():
            grads = self._grads(params, loss_scale)
            weights = self._weights(params)
            if stats:
                sumsq, max_abs, bad = tensor_stats(grads)
                total += sumsq
                values.update({f"norm/{layer}": math.sqrt(sumsq), f"max_abs/{layer}": max_abs,
                               f"nonfinite/{layer}": bad})
                before[layer] = weights
            if hist:
                log.histogram(step, f"hist_grad/{layer}", torch.cat([g.flatten() for g in grads]))
                log.histogram(step, f"hist_weight/{layer}", torch.cat([w.flatten() for w in weights]))
        if stats:
            values["global_norm"] = math.sqrt(total)
            bad = [k.split("/", 1)[1] for k, v in values.items() if k.startswith("nonfinite/") and v]
            if bad:
                log.warn_once(f"step {step}: NaN/Inf gradients in {', '.join(bad)}")
            log.scalars(step, values, split="grad")
            self._before = (step, before)

    def after_step(self, log) -> None:
        """Call on every rank right after engine.step(): logs ||ΔW|| / ||W|| per layer."""
        if self._before is None:
            return
        step, before = self._before
        self._before = None
        ratios = {}
        for layer, params in self.groups.items():
            after = self._weights(params)
            delta = sum(sq_norm(a - b) for a, b in zip(after, before[layer]))
            norm = sum(sq_norm(b) for b in before[layer])
            ratios[f"update_ratio/{layer}"] = math.sqrt(delta) / max(math.sqrt(norm), 1e-30)
        log.scalars(step, ratios, split="grad")

    def first_nonfinite_layer(self, loss_scale: float = 1.0) -> str | None:
        """The first layer (in model order) whose accumulated gradient holds a NaN/Inf, or None.
        Call on every rank before engine.step() (collectives); the full gradients are the same on
        every rank, so all ranks stop gathering at the same layer."""
        for layer, params in self.groups.items():
            if any(not bool(torch.isfinite(g).all()) for g in self._grads(params, loss_scale)):
                return layer
        return None
