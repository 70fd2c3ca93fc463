# Round 11: plain sampling (generate, temperature 0.7) with torch.multinomial (before) and the inverse-CDF sample (now),
# alternating; the n_future 4 demo export of round 10 at /work/demo4_run/export (32 demo scenes, one thread).
# Run from the repository root: PYTHONPATH=. python docs/bench/issue9_round11/plain_sampling.py
import statistics, sys, time, torch
sys.path.insert(0, "tools")
from bench_decode import load_images
import vlm_dist.infer.generate as G
from vlm_dist.infer.load import load_exported
from vlm_dist.text import get_tokenizer, prompt_tokens
torch.set_num_threads(1)
model, _ = load_exported("/work/demo4_run/export")
imgs, p = load_images(model, None, 32), prompt_tokens(get_tokenizer())
new = G.sample
old = lambda probs, generator: torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
for B in (1, 8):
    tps = {"multinomial (before)": [], "inverse CDF (now)": []}
    for rep in range(3):
        for name, fn in (("multinomial (before)", old), ("inverse CDF (now)", new)):
            G.sample = fn
            g = torch.Generator().manual_seed(rep)
            t = time.perf_counter(); n = 0
            for i in range(0, 32, B):
                n += sum(map(len, G.generate(model, imgs[i:i+B], [p] * len(imgs[i:i+B]), 24, temperature=0.7, generator=g)))
            tps[name].append(n / (time.perf_counter() - t))
    m = {k: statistics.median(v) for k, v in tps.items()}
    print(f"| {B} | {m['multinomial (before)']:.0f} | {m['inverse CDF (now)']:.0f} | {m['inverse CDF (now)'] / m['multinomial (before)']:.2f}x |", flush=True)
