# Round 11: torch.profiler over 16 single-image decodes, speculative sampling then plain sampling (temperature 0.7,
# one thread). Run from the repository root: PYTHONPATH=. python docs/bench/issue9_round11/profile_samplers.py
import sys, torch, time
sys.path.insert(0, "tools")
from bench_decode import load_images
from vlm_dist.infer.load import load_exported
from vlm_dist.infer.spec_sampling import speculative_sample_batch
from vlm_dist.infer.generate import generate
from vlm_dist.text import get_tokenizer, prompt_tokens
torch.set_num_threads(1)
model, _ = load_exported("/work/demo4_run/export")
imgs = load_images(model, None, 16); p = prompt_tokens(get_tokenizer())
g = torch.Generator().manual_seed(0)
from torch.profiler import profile
for name, fn in (("spec", lambda b: speculative_sample_batch(model, b, [p], 24, 0.7, generator=g)), ("plain", lambda b: generate(model, b, [p], 24, temperature=0.7, generator=g))):
    for i in range(4): fn(imgs[i:i+1])
    with profile() as prof:
        for i in range(16): fn(imgs[i:i+1])
    print(name); print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
