"""Token-comparison images and position-wise accuracy for validation (pure renderers + a recorder).

    rec = EvalRecorder(n_future=3, text_len=T, n_samples=4)
    rec.add(images, targets, pred, keep)         # per val batch: (B,3,H,W), (B,n,T), (B,n,T), (B,)
    counts = rec.position_counts()               # (2, n, T) correct / valid: all-reduce it over ranks
    rec.write(log, step, reduced_counts)         # rank 0's logger renders; the NullLogger does nothing

`render_comparison` draws, for one sample, the image thumbnail and one pair of rows per head: the
ground-truth target tokens, and below them the teacher-forced predictions aligned position by
position, each prediction cell filled green (right) or red (wrong). Positions where no head has a
target (the prompt, padding) are left out; a head without a target at a kept position shows a grey cell.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vlm_dist.text import IGNORE_INDEX, get_tokenizer

GREEN, RED, GREY, WHITE, BLACK = (60, 170, 75), (220, 60, 60), (200, 200, 200), (255, 255, 255), (0, 0, 0)
TRUTH_BG = (235, 235, 245)
HEAD_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127)]
CELL_W, CELL_H, LABEL_W, THUMB, PAD, MAX_CHARS = 64, 14, 48, 64, 4, 10


def unnormalise(image: torch.Tensor) -> np.ndarray:
    """An open_clip-normalised (3, H, W) tensor -> (H, W, 3) uint8, undoing OPENAI_DATASET_MEAN/STD."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    x = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def token_text(token_id: int, decode: Callable[[int], str] | None = None) -> str:
    """Readable text of one token id (special tokens by name), clipped to MAX_CHARS."""
    if token_id == IGNORE_INDEX:
        return ""
    tok = get_tokenizer()
    if token_id == tok.eos_id:
        return "<eot>"
    if token_id == tok.bos_id:
        return "<sot>"
    text = decode(token_id) if decode is not None else tok.decode([token_id])
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "~"


def comparison_columns(targets: torch.Tensor) -> list[int]:
    """Positions where at least one head has a target: targets (n, T) -> kept column indices."""
    return (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten().tolist()


def cell_box(head: int, row: int, col: int, thumb: int = THUMB) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a token cell: row 0 = ground truth, 1 = prediction; col = kept column."""
    x0 = thumb + 2 * PAD + LABEL_W + col * CELL_W
    y0 = PAD + CELL_H + (2 * head + row) * CELL_H  # the first CELL_H is the header (positions)
    return x0, y0, x0 + CELL_W - 1, y0 + CELL_H - 1


def render_comparison(targets: torch.Tensor, pred: torch.Tensor, image: np.ndarray | None = None,
                      decode: Callable[[int], str] | None = None) -> np.ndarray:
    """targets, pred (n_heads, T) token ids (IGNORE_INDEX where a head has no target); image
    (h, w, 3) uint8 or None -> (H, W, 3) uint8. Layout from `cell_box`; colours GREEN/RED/GREY."""
    n = targets.shape[0]
    cols = comparison_columns(targets)
    width = THUMB + 2 * PAD + LABEL_W + max(len(cols), 1) * CELL_W + PAD
    height = max(PAD + CELL_H * (1 + 2 * n) + PAD, THUMB + 2 * PAD)
    canvas = Image.new("RGB", (width, height), WHITE)
    if image is not None:
        canvas.paste(Image.fromarray(image).resize((THUMB, THUMB), Image.NEAREST), (PAD, PAD))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, t in enumerate(cols):
        x0, _, _, _ = cell_box(0, 0, c)
        draw.text((x0 + 2, PAD + 1), f"t={t}", fill=BLACK, font=font)
    for k in range(n):
        draw.text((THUMB + 2 * PAD, cell_box(k, 0, 0)[1] + 1), f"h{k} gt", fill=BLACK, font=font)
        draw.text((THUMB + 2 * PAD, cell_box(k, 1, 0)[1] + 1), f"h{k} pr", fill=BLACK, font=font)
        for c, t in enumerate(cols):
            truth, guess = int(targets[k, t]), int(pred[k, t])
            box_gt, box_pr = cell_box(k, 0, c), cell_box(k, 1, c)
            draw.rectangle(box_gt, fill=TRUTH_BG, outline=WHITE)
            draw.text((box_gt[0] + 2, box_gt[1] + 1), token_text(truth, decode), fill=BLACK, font=font)
            fill = GREY if truth == IGNORE_INDEX else GREEN if guess == truth else RED
            draw.rectangle(box_pr, fill=fill, outline=WHITE)
            draw.text((box_pr[0] + 2, box_pr[1] + 1), token_text(guess, decode), fill=BLACK, font=font)
    return np.asarray(canvas)


def render_position_accuracy(correct: torch.Tensor, valid: torch.Tensor,
                             size: tuple[int, int] = (360, 200)) -> np.ndarray:
    """A line plot of token accuracy against target position, one coloured line per head:
    correct, valid (n_heads, T) counts -> (H, W, 3) uint8. Positions without targets are skipped."""
    W, H = size
    left, right, top, bottom = 34, 8, 8, 22
    canvas = Image.new("RGB", (W, H), WHITE)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    n, T = correct.shape
    x_of = lambda t: left + (W - left - right) * t / max(T - 1, 1)  # noqa: E731
    y_of = lambda a: top + (H - top - bottom) * (1 - a)  # noqa: E731
    draw.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill=BLACK)
    for a in (0.0, 0.5, 1.0):
        draw.text((2, y_of(a) - 5), f"{a:.1f}", fill=BLACK, font=font)
    draw.text((left, H - bottom + 4), "0", fill=BLACK, font=font)
    draw.text((W - right - 30, H - bottom + 4), f"t={T - 1}", fill=BLACK, font=font)
    draw.text((W // 2 - 40, H - bottom + 4), "target position", fill=BLACK, font=font)
    for k in range(n):
        colour = HEAD_COLOURS[k % len(HEAD_COLOURS)]
        pts = [(x_of(t), y_of(float(correct[k, t] / valid[k, t]))) for t in range(T) if valid[k, t] > 0]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((W - right - 40, top + 12 * k), f"head{k}", fill=colour, font=font)
    return np.asarray(canvas)


class EvalRecorder:
    """Collects, during one evaluation, position-wise accuracy counts and the first `n_samples`
    non-padding samples this rank sees (for rank 0: the first samples of its val loader)."""

    def __init__(self, n_future: int, text_len: int, n_samples: int) -> None:
        self.n_samples = n_samples
        # Fixed shapes (batches are padded to max_text_len - 1), so every rank all-reduces the same tensor.
        self.correct = torch.zeros(n_future, text_len, dtype=torch.float64)  # (n, T)
        self.valid = torch.zeros_like(self.correct)
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (image, targets, pred)

    def add(self, images: torch.Tensor | None, targets: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor) -> None:
        """images (B,3,H,W) or None (feature shards: no pixels to show), targets and pred (B,n,T), keep (B,)
        bool (False for padding repeats)."""
        targets, pred, keep = targets.cpu(), pred.cpu(), keep.cpu()
        valid = (targets != IGNORE_INDEX) & keep[:, None, None]
        self.correct += ((pred == targets) & valid).sum(0)
        self.valid += valid.sum(0)
        for i in keep.nonzero().flatten().tolist():
            if len(self.samples) >= self.n_samples:
                break
            self.samples.append((None if images is None else images[i].cpu(), targets[i], pred[i]))

    def position_counts(self) -> torch.Tensor:
        """(2, n, T) float64: correct and valid counts by head and position (to all-reduce)."""
        return torch.stack([self.correct, self.valid])

    def write(self, log, step: int, counts: torch.Tensor) -> None:
        """Log the comparison images and the accuracy plot (rendered only by a logger that writes)."""
        for i, (image, targets, pred) in enumerate(self.samples):
            render = lambda image=image, targets=targets, pred=pred: render_comparison(  # noqa: E731
                targets, pred, None if image is None else unnormalise(image))
            log.image(step, f"tokens/sample{i}", render)
        log.image(step, "val/position_accuracy", lambda: render_position_accuracy(counts[0], counts[1]))
