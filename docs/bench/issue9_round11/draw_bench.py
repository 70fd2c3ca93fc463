# Round 11: one draw per row, torch.multinomial vs vlm_dist.infer.generate.sample (one thread, medians of 7 x 50 draws).
# Run from the repository root: PYTHONPATH=. python docs/bench/issue9_round11/draw_bench.py
import statistics, time, torch
from vlm_dist.infer.generate import sample
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
for B in (1, 8):
    p = torch.softmax(torch.randn(B, 49408, generator=g) * 3, -1)
    res = {}
    for name, f in (("torch.multinomial", lambda: torch.multinomial(p, 1, generator=g)), ("sample (inverse CDF)", lambda: sample(p, g))):
        for _ in range(5): f()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(50): f()
            ts.append((time.perf_counter() - t) / 50 * 1e6)
        res[name] = statistics.median(ts)
    print(f"rows {B}: " + ", ".join(f"{k} {v:.0f} us" for k, v in res.items()) + f"; ratio {res['torch.multinomial'] / res['sample (inverse CDF)']:.1f}x")
