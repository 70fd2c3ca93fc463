"""Rank-0 observability: TensorBoard, metrics.jsonl, console progress.

    logger.py     the one place with rank gating (RunLogger on rank 0, NullLogger elsewhere)
    timing.py     forward / backward / optimizer / observe sections of a step
    flops.py      analytic training FLOPs, MFU against the device's bf16 peak, memory in use
    gradstats.py  per-layer gradient statistics, update ratios and histograms under ZeRO 1/2/3
    tokens.py     token-comparison images and position-wise accuracy at eval

Nothing here imports deepspeed: the trainer passes DeepSpeed's gather functions in (train/loop.py).
"""
