import os

# No network here: an open_clip pretrained-weights lookup would otherwise hang ~45 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
