"""After training: export (DeepSpeed checkpoint -> safetensors), loading without DeepSpeed,
KV-cached generation, and evaluation."""
