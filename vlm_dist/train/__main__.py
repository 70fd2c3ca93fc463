"""`deepspeed --num_gpus N --module vlm_dist.train ...`, `torchrun ... -m vlm_dist.train ...` or `python -m vlm_dist.train ...`."""

import sys

from vlm_dist.train.entry import main

sys.exit(main())
