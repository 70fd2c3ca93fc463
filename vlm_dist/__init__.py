"""vlm-dist: DeepSpeed ZeRO training of a small vision-language model with multi-token prediction."""

__version__ = "0.1.0"
