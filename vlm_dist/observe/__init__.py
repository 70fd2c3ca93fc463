"""Rank-0 observability: TensorBoard, metrics.jsonl, console progress."""
