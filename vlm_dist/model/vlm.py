"""The vision-language model: open_clip vision tower -> linear projector -> causal decoder -> LM head
(+ multi-token heads). Builds from a ModelConfig alone; imports torch and open_clip only.

    model = VLM(load_config("tiny").model)
    out = model(images, input_ids, targets)            # training: out["loss"], out["head_losses"]
    cache = model.new_cache(batch=B)                   # generation: KV-cached incremental decoding
    logits = model.step(input_ids[:, :1], cache, images=images)   # prefill with the image
    logits = model.step(next_ids, cache)               # then one (or a few) tokens at a time
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm_dist.config import ModelConfig
from vlm_dist.model import packed
from vlm_dist.model.argmax import CertifiedArgmax
from vlm_dist.model.decoder import Block, KVCache, checkpointed, sinusoidal_positions
from vlm_dist.model.heads import ExtraHeads, FusedHeads
from vlm_dist.model.loss import Unembedding
from vlm_dist.model.stamps import stamp, stamps
from vlm_dist.model.vision import VisionEncoder
from vlm_dist.text import IGNORE_INDEX, get_tokenizer


class VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size = vocab_size or get_tokenizer().vocab_size
        D = cfg.d_model
        self.vision = VisionEncoder(cfg.vision)
        self.projector = nn.Linear(self.vision.width, D)  # (B, P, W_vision) -> (B, P, D)
        self.tok_emb = nn.Embedding(vocab_size, D)
        # the first text_first_layers blocks: text attends to text only (config.ModelConfig.text_first_layers)
        self.blocks = nn.ModuleList(
            Block(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.attention,
                  cfg.n_image_tokens if i < cfg.text_first_layers else 0) for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.extra_heads = ExtraHeads(cfg)
        self.lm_head = Unembedding(D, vocab_size)  # nn.Linear (V, D) that can also score targets in chunks
        self._init_decoder_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.compile:
            self.compile_regions()

    def compile_regions(self, tower: bool = True, blocks: bool = True, loss: bool = True) -> None:
        """Regional torch.compile (model.compile: all three): the vision tower, every decoder block (trunk and
        extra heads: one graph serves them all) and the head loss's chunk kernels; False turns a region back
        to eager (compiled graphs stay cached). The state dict and cached decoding are unchanged.
        Whole-model compilation (DeepSpeed's engine.compile) did not finish warming up in 90 s on an H100
        (round 5)."""
        self.vision.compiled = tower
        for block in [*self.blocks, *self.extra_heads.blocks]:
            block.compiled = blocks
        self.lm_head.fused = loss

    def _init_decoder_weights(self) -> None:
        """Normal(0, init_std) for decoder linears/embeddings; residual output layers scaled by
        1/sqrt(2 * depth) (GPT-2). The vision tower keeps open_clip's init or its loaded weights."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if name.startswith("vision"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        depth = self.cfg.n_layers + self.cfg.n_future - 1
        for block in [*self.blocks, *self.extra_heads.blocks]:
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * depth))
            nn.init.normal_(block.mlp[2].weight, std=std / math.sqrt(2 * depth))

    # --- pieces -------------------------------------------------------------------------------

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.n_image_tokens

    def embed(self, images: torch.Tensor | None, input_ids: torch.Tensor, offset: int = 0,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """[projected image tokens ; token embeddings] + scaled sinusoidal positions: (B, S, D). Positions
        run from `offset`, or are given per row as `positions` (B, S) (a ragged KV cache). `images`: pixels
        (B, 3, H, W), or the frozen tower's output for them (B, P, W_vision): precomputed features
        (data/features.py), which go to the projector as the tower's own output would."""
        x = self.tok_emb(input_ids)  # (B, T, D)
        if images is not None:
            img = self.projector(self.image_tokens(images.to(self.projector.weight.dtype)))  # (B, P, D)
            x = torch.cat([img, x], dim=1)
        table = self._position_table(x.dtype, x.device)  # (L, D): pos_scale * sinusoidal positions
        if positions is None:
            if offset + x.shape[1] <= table.shape[0]:
                return x + table[offset : offset + x.shape[1]]
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        elif int(positions.max()) < table.shape[0]:
            return x + table[positions]
        pe = sinusoidal_positions(positions.reshape(-1), x.shape[-1]).view(*positions.shape, -1)
        return x + self.cfg.pos_scale * pe.to(x.dtype)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's tokens (B, P, W_vision) for pixels (B, 3, H, W); precomputed tokens pass through, checked."""
        if images.dim() == 4:
            return self.vision(images)
        if images.dim() != 3 or images.shape[1:] != (self.n_image_tokens, self.vision.width):
            raise ValueError(f"images of shape {tuple(images.shape)}: give pixels (B, 3, H, W) or the tower's "
                             f"tokens (B, {self.n_image_tokens}, {self.vision.width})")
        if not self.vision.frozen:  # the tower would train, but precomputed tokens bypass it
            raise ValueError("precomputed tower features need a frozen tower (model.vision.freeze=true): this "
                             "model's tower trains, and its gradients would never reach it")
        return images

    def _position_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """pos_scale * sinusoidal positions for 0 .. max_seq_len + 63 (spare slots of speculative decoding),
        (L, D), made once per dtype and device: a decoding step indexes it instead of recomputing ~10 kernels."""
        key = (dtype, device)
        if getattr(self, "_pos_key", None) != key:
            pe = sinusoidal_positions(torch.arange(self.cfg.max_seq_len + 64, device=device), self.cfg.d_model)
            self._pos_table, self._pos_key = self.cfg.pos_scale * pe.to(dtype), key
        return self._pos_table

    def trunk(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Causal blocks over x (B, S, D) -> last hidden state (B, S, D), before the final norm."""
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpointed(block, x)
            else:
                x = block(x, cache, i)
        return x

    def head_states(self, h: torch.Tensor, cache: KVCache | None = None) -> list[torch.Tensor]:
        """One normalised (B, T, D) state per head: next token first, then t+2 .. t+n_future."""
        return [self.norm(h), *self.extra_heads(h, cache, first_layer=self.cfg.n_layers)]

    # --- training / teacher-forced forward ---------------------------------------------------

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = False) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), input_ids (B, T), targets (B, n_future, T) with IGNORE_INDEX where unused.

        Returns `loss` (weighted sum of head losses), `head_losses` (n_future,), `sample_losses`
        (B, n_future, detached, for evaluation) and, when asked or when
        no targets are given, `logits` (B, n_future, T, V) over the text positions. Each head's loss is
        the mean over samples of the sample's mean token cross-entropy, so it is the same whether a
        global batch is split across ranks or accumulation steps or not.
        """
        P = self.n_image_tokens
        h = self.trunk(self.embed(images, input_ids))  # (B, P+T, D)
        out: dict[str, torch.Tensor] = {}
        if return_logits or targets is None:
            states = [s[:, P:] for s in self.head_states(h)]  # text positions only: (B, T, D) per head
            out["logits"] = torch.stack([self.lm_head(s) for s in states], dim=1)  # (B, n_future, T, V)
        if targets is not None:
            out.update(self.head_loss(h, targets))
        return out

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' training loss from the trunk's last hidden state h (B, P+T, D), targets (B, n, T).

        Every head's valid positions go through ONE chunked linear + cross-entropy (model/loss.py): no
        head's (rows, V) logits are ever whole, and W gets one gradient, not one per head
        (tools/bench_head_loss.py measures the peak against all heads' logits at once).
        """
        P, n, B = self.n_image_tokens, self.cfg.n_future, targets.shape[0]
        valid = targets != IGNORE_INDEX  # (B, n, T)
        x = torch.cat([self._head_state(k, h)[:, P:][valid[:, k]] for k in range(n)])  # (N, D), head-major
        ce = self.lm_head(x, targets.transpose(0, 1)[valid.transpose(0, 1)])  # (N,) fp32, same order
        # per (sample, head) mean over the sample's valid targets (0 where it has none): (B, n)
        counts = valid.sum(dim=2)  # (B, n)
        per_head = ce.split(counts.sum(dim=0).tolist())
        per_sample = torch.stack([torch.zeros(B, dtype=ce.dtype, device=ce.device).index_add(
            0, valid[:, k].nonzero(as_tuple=True)[0], c) / counts[:, k].clamp(min=1) for k, c in enumerate(per_head)], 1)
        weights = torch.tensor(self.cfg.head_weights, dtype=per_sample.dtype, device=per_sample.device)
        head_losses = per_sample.mean(dim=0)  # (n_future,)
        return {"loss": (weights * head_losses).sum(), "head_losses": head_losses.detach(),
                "sample_losses": per_sample.detach()}

    def _head_state(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Head k's normalised state (B, S, D) from the trunk's h: the final norm (k = 0), else extra block
        k-1 (checkpointed like the trunk's) and its norm. Same computation as `head_states`, one head."""
        if k == 0:
            return self.norm(h)
        block, norm = self.extra_heads.blocks[k - 1], self.extra_heads.norms[k - 1]
        if self.cfg.activation_checkpointing and self.training:
            return norm(checkpointed(block, h))
        return norm(block(h))

    # --- incremental decoding ----------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        cfg = self.cfg
        return KVCache(cfg.n_layers + cfg.n_future - 1, batch, cfg.n_heads, cfg.d_model // cfg.n_heads,
                       max_len or cfg.max_seq_len, p.dtype, p.device)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: KVCache, images: torch.Tensor | None = None,
             next_token_only: bool = False) -> torch.Tensor:
        """Feed input_ids (B, T) after what `cache` holds (the image too, on the first call) and return
        logits (B, n_future, T, V) for these T positions; the cache grows by T (+ image tokens).

        next_token_only=True skips the extra heads (their blocks and unembeddings): logits (B, 1, T, V),
        for plain decoding. Use one setting for the life of a cache: skipped heads leave their layers unfilled.
        """
        states = self.step_states(input_ids, cache, images, next_token_only)
        return torch.stack([self.lm_head(s) for s in states], dim=1)

    @torch.no_grad()
    def step_states(self, input_ids: torch.Tensor, cache: KVCache, images: torch.Tensor | None = None,
                    next_token_only: bool = False) -> list[torch.Tensor]:
        """`step` before the unembedding: one normalised (B, T, D) state per head, for callers that
        need the logits of only some heads or positions (speculative decoding). Row b's tokens go after
        the cache's lengths[b] positions (a ragged cache: each row at its own position)."""
        h = self.fed_states(input_ids, cache, images)
        # the extra heads see image positions too, as in forward
        states = [self.norm(h)] if next_token_only else self.head_states(h, cache)
        cache.advance(h.shape[1])
        T = input_ids.shape[1]
        return [s[:, -T:] for s in states]

    @torch.no_grad()
    def verify_step(self, input_ids: torch.Tensor, cache: KVCache, images: torch.Tensor | None = None,
                    last: torch.Tensor | None = None, heads: FusedHeads | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One call of self-speculative decoding. Feeds input_ids (B, T) (a draft, or the padded prompts on
        the first call, with images) after the cache; every row's cache grows by T (the caller crops).

        Returns (next_ids (B,), last (B,), guesses (B, n-1)). `last`: the fed position whose successor
        comes next: as given (the prompts' last positions), else the end of the longest accepted prefix
        (draft token i+1 is accepted while it equals head 0's exact argmax after token i: last + 1 tokens
        accepted). next_ids: head 0's exact full-vocabulary argmax there; guesses: the extra heads'
        argmaxes (certified too: on an untrained model a shortlist-only guess would rarely be right).
        The extra heads run stacked (`heads`, default `fused_heads()`: pass it in a decoding loop, its
        check walks the heads' parameters), and only at `last` for all but their keys and values.
        """
        B, T = input_ids.shape
        h = self.fed_states(input_ids, cache, images)  # (B, S, D): S = T, or P + T on the first call
        if last is None:
            greedy = self.greedy_ids(self.norm(h[:, -T:]))  # (B, T): head 0's choice after each draft token
            match = (input_ids[:, 1:] == greedy[:, :-1]).long()  # (B, T-1)
            last = match.cumprod(dim=1).sum(dim=1)  # (B,)
            next_ids = greedy.gather(1, last[:, None]).squeeze(1)  # (B,)
        else:  # the prompts: only each row's last position matters
            rows = torch.arange(B, device=h.device) * h.shape[1] + (h.shape[1] - T) + last  # (B,) in (B*S)
            next_ids = self.greedy_ids(self.norm(h.reshape(-1, h.shape[-1]).index_select(0, rows)))
        if self.cfg.n_future > 1:
            heads = heads or self.fused_heads()
            guesses = self.greedy_ids(heads(h, cache, self.cfg.n_layers, last + (h.shape[1] - T))).T  # (B, n-1)
        else:
            guesses = next_ids[:, None][:, :0]
        cache.advance(h.shape[1])
        return next_ids, last, guesses

    def fed_states(self, input_ids: torch.Tensor, cache: KVCache, images: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's states (B, S, D) of input_ids (B, T) fed after each row's cache (images, and so S = P + T,
        on the first call only), writing the trunk's keys and values; the caller advances the cache by S once the
        extra heads have written theirs (step_states, verify_step; infer/spec_sampling.py)."""
        if images is not None and max(cache.lengths) > 0 or images is None and min(cache.lengths) == 0:
            raise ValueError("pass images on the first step (empty cache) and only then")
        if cache.uniform:
            x = self.embed(images, input_ids, offset=cache.lengths[0])
        else:
            x = self.embed(None, input_ids, positions=cache.positions(input_ids.shape[1]))
        return self.trunk(x, cache)

    def fused_heads(self) -> FusedHeads:
        """The extra heads stacked for drafting (heads.FusedHeads), rebuilt whenever one of their weights
        changes (an optimizer step or a load bumps a version; .to() makes new tensors; a write through
        `.data`, as DeepSpeed's ZeRO makes, bumps none: drop_decode_caches)."""
        key = stamps(self.extra_heads.parameters())
        if getattr(self, "_fused_key", None) != key:
            self._fused, self._fused_key = FusedHeads(self.extra_heads), key
        return self._fused

    @torch.no_grad()
    def greedy_ids(self, states: torch.Tensor) -> torch.Tensor:
        """Exact argmax over the full vocabulary of the logits of normalised states (..., D) -> ids (...):
        a shortlist's logits and a certificate, the full matmul only for rows it does not certify
        (`argmax_table`, model/argmax.py)."""
        return self.argmax_table()(states.reshape(-1, states.shape[-1])).view(states.shape[:-1])

    def argmax_table(self) -> CertifiedArgmax:
        """The unembedding's CertifiedArgmax, rebuilt whenever the weight changes (an optimizer step or a
        load bumps its version; .to() makes a new tensor; a write through `.data`, as DeepSpeed's ZeRO
        makes, bumps none: drop_decode_caches)."""
        W = self.lm_head.weight
        key = (*stamp(W), W.dtype, W.device)
        if getattr(self, "_argmax_key", None) != key:
            self._argmax, self._argmax_key = CertifiedArgmax(W), key
        return self._argmax

    def drop_decode_caches(self) -> None:
        """Forget the argmax table, the stacked heads, the static decoding sessions and the packed bf16 weights; the next decode rebuilds them from the weights
        (0.3 s at the demo width, 2.3 s at base width, on one core of the 2-core EPYC; once per
        generation eval in training). Their keys (model/stamps.py: data_ptr, version) catch an optimizer step of plain
        PyTorch's default (foreach) AdamW, a load and .to(), but not a write through `.data`, which is how
        DeepSpeed's ZeRO optimizer updates the weights (same storage, no version bump), nor, a review found,
        torch's fused AdamW kernel: a stale table would pick greedy
        tokens from old rows under an old certificate. So decoding a model in training mode drops them
        first and again when it hands the model back (infer/generate.py `decoding`: the trainer's generation
        eval; later steps would make them stale, and the packed copies take memory); call it yourself after
        writing an eval-mode model's weights through `.data`. Dropping, not comparing with copies of the
        weights, keeps no second copy of the (V, D) unembedding (150 MB at base width)."""
        self._argmax_key = self._fused_key = None
        self._argmax = self._fused = None
        self.__dict__.pop("_static_sessions", None)  # infer/static.py: steps captured over the old weights
        packed.drop(self)  # bf16 weights packed for CPU decoding (model/packed.py)

    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), .half() ...: the decode caches hold tensors of the old device or dtype (a captured
        decoding step's KV cache and graph among them), so they go first."""
        self.drop_decode_caches()
        self._pos_key = self._pos_table = None
        return super()._apply(fn, *args, **kwargs)
