"""Quick ablations of the demo task in plain PyTorch: train the `demo` preset (with overrides) on in-memory
demo scenes and print held-out accuracy every --eval-every steps, split by one- and two-shape scenes.

    python tools/demo_ablate.py --steps 1600 --lr 5e-4 --set model.n_future=1 --tag nf1

One process, one thread, no DeepSpeed: a cheap stand-in for `make demo` (tools/run_demo.sh) when
comparing settings, not a replacement for it. Images take the trainer's path (64 px JPEG as demo-data
writes them -> ImageToTensor), batches mix captions and one random question per image (--qa), AdamW
with linear warm-up and cosine decay to --min-ratio, as ds_configs/demo_zero2.json.

Accuracy is teacher-forced exact match on 150 held-out scenes (every caption and every question):
a sample counts when the argmax of the next-token head equals the reference at every target position,
end token included. That is exactly greedy decoding's exact match (greedy reproduces the reference iff
each reference token is the argmax after the reference prefix), at the cost of one forward pass.
Keys: "caption/1", "what colour/2", ... (one- / two-shape scenes), then the type over both, and "qa";
for two-shape colour / size questions also "what colour/2 kind-L" (the shape named by kind, the left one),
".../2 place-R" (named by place, the right one), ..., and among the wrong answers the share that was the
other shape's value ("wrong: other") and the left shape's ("wrong: left"). A model that gives both
questions of a scene the same answer scores a constant there (docs/bench/issue10_round4.md).
--train-eval repeats it on 150 training scenes ("train:..."); --show N prints decoded training examples;
--text-first N sets model.text_first_layers; --prefix-lm trains and scores with a prefix-LM mask.

    python tools/demo_ablate.py --steps 1600 --n-train 4800 --eval-every 400 --train-eval --text-first 0 --tag base
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm_dist.config import load_config  # noqa: E402
from vlm_dist.data.demo import caption, make_scene, questions, render  # noqa: E402
from vlm_dist.data.samples import ImageToTensor, draw_turns  # noqa: E402
from vlm_dist.model import VLM  # noqa: E402
from vlm_dist.model.decoder import Attention  # noqa: E402
from vlm_dist.text import IGNORE_INDEX, add_turns, build_example, collate_examples, get_tokenizer, make_targets  # noqa: E402


_PREFIX: list[torch.Tensor | None] = [None]  # (B, 1, S, S) bool attention mask while --prefix-lm is on


def prefix_lm(model: VLM, examples, tokens: torch.Tensor) -> None:
    """--prefix-lm: image + prompt attend to each other both ways (PaliGemma's prefix-LM); the target
    tokens stay causal. Sets the mask every uncached attention of the next forward uses."""
    B, T = tokens.shape
    S = model.n_image_tokens + T - 1  # image tokens + inputs (tokens[:, :-1])
    prefix = torch.tensor([model.n_image_tokens + e.loss_mask.index(True) for e in examples])  # (B,)
    i = torch.arange(S)
    _PREFIX[0] = ((i[None, :] <= i[:, None])[None] | (i[None, None, :] < prefix[:, None, None]))[:, None]


def _attend(self, qkv: torch.Tensor, cache, layer: int) -> torch.Tensor:
    """Attention.attend, with the prefix-LM mask while --prefix-lm sets one (training / teacher forcing only)."""
    if _PREFIX[0] is None or cache is not None:
        return _plain_attend(self, qkv, cache, layer)
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
    mask = _PREFIX[0]
    if self.hide_image:  # a text_first_layers block: text queries see no image key
        i = torch.arange(T)
        mask = mask & ~((i[:, None] >= self.hide_image) & (i[None, :] < self.hide_image))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)


_plain_attend = Attention.attend
Attention.attend = _attend


def scenes(n: int, seed: str, to_tensor: ImageToTensor) -> list[tuple[torch.Tensor, str, list[tuple[str, str]], list]]:
    """n demo scenes: (image in the model's input transform, caption, [(question, answer)], scene)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        scene = make_scene(rng)
        buf = io.BytesIO()
        render(scene, rng, 64).save(buf, "JPEG", quality=90, subsampling=0)  # as `vlm-dist demo-data` writes them
        out.append((to_tensor(buf.getvalue()), caption(scene), questions(scene), scene))
    return out


def held_out(val, tok, max_len: int) -> tuple[list, list[int], list[str], list]:
    """Every caption and question of the held-out scenes: (examples, image index, key, probe).

    probe: for a colour/size question about one of two shapes, (detail key, the other shape's answer
    token, the left shape's answer token), else None. Detail keys: "what colour/2 kind-L" (named by
    kind, asking about the left shape), ".../2 place-R" (named by place, the right shape), ...
    """
    examples, image_of, keys, probes = [], [], [], []
    for i, (_, cap, qa, scene) in enumerate(val):
        n_shapes = "/2" if " and " in cap else "/1"
        examples.append(build_example(tok, cap, max_len))
        image_of.append(i)
        keys.append("caption" + n_shapes)
        probes.append(None)
        for q, a in qa:
            examples.append(build_example(tok, a, max_len, question=q))
            image_of.append(i)
            key = " ".join(q.split()[:2])
            keys.append(key + n_shapes)
            probe = None
            if len(scene) == 2 and key in ("what colour", "what size"):
                attr = "colour" if key == "what colour" else "size"
                by_place = "on the" in q
                side = (1 if q.rstrip("?").endswith("right") else 0) if by_place else \
                    [s["kind"] for s in scene].index(q.rstrip("?").split()[-1])
                assert scene[side][attr] == a, (q, a, scene)  # the label is the asked shape's attribute
                probe = (f"{key}/2 {'place' if by_place else 'kind'}-{'LR'[side]}",
                         tok.encode(scene[1 - side][attr])[0], tok.encode(scene[0][attr])[0])
            probes.append(probe)
    return examples, image_of, keys, probes


@torch.no_grad()
def evaluate(model: VLM, val, examples, image_of, keys, probes, pad_id: int, bf16: bool, prefix: bool = False) -> dict[str, float]:
    """Exact match per key and type; for two-shape colour/size questions also per detail key, and among
    the wrong answers the share that named the OTHER shape's value ("... other") and the LEFT one's."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for s in range(0, len(examples), 128):
        tokens, mask = collate_examples(examples[s:s + 128], pad_id)
        inputs, targets = make_targets(tokens, mask, 1)
        images = torch.stack([val[j][0] for j in image_of[s:s + 128]])
        if prefix:
            prefix_lm(model, examples[s:s + 128], tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model.trunk(model.embed(images, inputs))[:, model.n_image_tokens:]  # text positions (B, T, D)
            pred = F.linear(model.norm(h), model.lm_head.weight).argmax(-1)  # next-token head only
        t = targets[:, 0]
        ok = ((pred == t) | (t == IGNORE_INDEX)).all(-1)
        first = (t != IGNORE_INDEX).int().argmax(-1)  # (B,) the first target position: the answer word
        said = pred.gather(1, first[:, None])[:, 0]  # (B,) the answer word the model gives
        for key, o, probe, w in zip(keys[s:s + 128], ok.tolist(), probes[s:s + 128], said.tolist()):
            hits.setdefault(key, []).append(o)
            if probe is not None:
                detail, other, left = probe
                hits.setdefault(detail, []).append(o)
                if not o:
                    hits.setdefault(key + " wrong: other", []).append(w == other)
                    hits.setdefault(key + " wrong: left", []).append(w == left)
    model.train()
    _PREFIX[0] = None
    out = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    by_type: dict[str, list[bool]] = {}
    for k, v in hits.items():
        if k[-2:] in ("/1", "/2"):
            by_type.setdefault(k[:-2], []).extend(v)
    out.update({k: round(sum(v) / len(v), 3) for k, v in by_type.items()})
    qa = [o for k, v in by_type.items() if k != "caption" for o in v]
    out["qa"] = round(sum(qa) / len(qa), 3)
    out["n"] = {k: len(v) for k, v in sorted(hits.items()) if " wrong" in k}
    return out


def show_examples(train, tok, max_len: int, n: int) -> None:
    """Print the first n two-shape training scenes with every training text decoded from its tokens
    (what reaches the model): a check that questions and answers match the rendered scene."""
    shown = 0
    for _, cap, qa, scene in train:
        if len(scene) < 2 or shown >= n:
            continue
        shown += 1
        print("scene:", [(s["position"], s["size"], s["colour"], s["kind"]) for s in scene])
        for q, a in [(None, cap), *qa]:
            e = build_example(tok, a, max_len, question=q)
            body = [i for i, m in zip(e.tokens, e.loss_mask) if m]
            print("   ", repr(tok.decode([i for i, m in zip(e.tokens, e.loss_mask) if not m])), "->", repr(tok.decode(body)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (the cosine decay spans them)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--tower-lr", type=float, default=None, help="peak learning rate of the vision tower (default --lr)")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--min-ratio", type=float, default=0.05, help="final learning rate / peak")
    p.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--batch", type=int, default=32, help="samples per step (the demo's global batch)")
    p.add_argument("--n-train", type=int, default=2000, help="distinct training scenes (the demo's N_TRAIN)")
    p.add_argument("--qa", type=float, default=0.5, help="probability that a sample is a question (data.qa_fraction)")
    p.add_argument("--set", action="append", default=[], help="config override on the demo preset, e.g. model.n_future=1")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the demo's bf16 'auto' on CPUs with native bf16)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="run", help="label printed on every line")
    p.add_argument("--train-eval", action="store_true", help="also evaluate on 150 training scenes (keys train:...)")
    p.add_argument("--prefix-lm", action="store_true", help="image + prompt attend both ways (prefix-LM), targets causal")
    p.add_argument("--text-first", type=int, default=None,
                   help="model.text_first_layers: in the first N decoder blocks text does not attend to the image (default: the preset's)")
    p.add_argument("--show", type=int, default=0, help="print this many decoded two-shape training scenes first")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("demo", a.set + ([] if a.text_first is None else [f"model.text_first_layers={a.text_first}"]))
    tok, to_tensor = get_tokenizer(), ImageToTensor(cfg.model.vision.geometry["image_size"])
    train, val = scenes(a.n_train, f"tr{a.seed}", to_tensor), scenes(150, "val", to_tensor)
    if a.show:
        show_examples(train, tok, cfg.data.max_text_len, a.show)
    sets = [("", val, *held_out(val, tok, cfg.data.max_text_len))]
    if a.train_eval:
        sets.append(("train:", train[:150], *held_out(train[:150], tok, cfg.data.max_text_len)))
    torch.manual_seed(a.seed)
    model = VLM(cfg.model)
    tower = [q for n, q in model.named_parameters() if n.startswith("vision.") and q.requires_grad]
    rest = [q for n, q in model.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW([{"params": rest, "lr": a.lr}, {"params": tower, "lr": a.tower_lr or a.lr}],
                            betas=(0.9, 0.95), weight_decay=a.wd)
    peaks = [g["lr"] for g in opt.param_groups]
    rng, t0, t_eval = random.Random(a.seed), time.time(), 0.0
    for step in range(1, a.steps + 1):
        f = min(1.0, step / a.warmup) * (a.min_ratio + (1 - a.min_ratio) * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = peak * f
        idx, batch = rng.sample(range(len(train)), a.batch), []
        for i in idx:
            _, cap, qa, _ = train[i]
            if qa and rng.random() < a.qa:  # a dialogue of data.qa_turns pairs, as the loader makes
                (q, ans), *more = draw_turns(qa, rng, cfg.data.qa_turns)
                example = build_example(tok, ans, cfg.data.max_text_len, question=q)
                batch.append(add_turns(tok, example, more, cfg.data.max_text_len)[0])
            else:
                batch.append(build_example(tok, cap, cfg.data.max_text_len))
        tokens, mask = collate_examples(batch, tok.pad_id)
        inputs, targets = make_targets(tokens, mask, cfg.model.n_future)
        if a.prefix_lm:
            prefix_lm(model, batch, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(torch.stack([train[i][0] for i in idx]), inputs, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            seconds, t1 = round(time.time() - t0 - t_eval), time.time()  # training time so far, evaluations excluded
            acc = {}
            for prefix, imgs, *held in sets:
                acc.update({prefix + k: v for k, v in evaluate(model, imgs, *held, tok.pad_id, a.bf16, a.prefix_lm).items()})
            print(json.dumps({"tag": a.tag, "step": step, "loss": round(loss.item(), 3),
                              "seconds": seconds, **acc}), flush=True)
            t_eval += time.time() - t1


if __name__ == "__main__":
    main()
