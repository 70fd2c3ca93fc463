"""Distributed training on a DeepSpeed ZeRO engine. Entry: `python -m vlm_dist.train --help`."""
