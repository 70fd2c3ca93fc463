# Round 11 probe: inductor (torch.compile, dynamic=False) on the fixed-shape decode steps on a CPU; one thread, the
# n_future 4 demo export, batch 1. Run from the repository root: PYTHONPATH=. python docs/bench/issue9_round11/compile_probe.py 1 cpp
# (a second argument turns on inductor's C++ wrapper). Not kept in the code: see issue9_round11.md.
import statistics, sys, time, torch
import vlm_dist.infer.static as ST
from vlm_dist.infer.load import load_exported
torch.set_num_threads(1)
model, _ = load_exported("/work/demo4_run/export")
model.eval()
B = int(sys.argv[1])
cache = model.new_cache(B, model.cfg.max_seq_len + 4)
S = ST.StaticSteps(model, cache); S.model = model
ids = torch.randint(0, 1000, (B, 1)); lengths = torch.full((B,), 60)
draft = torch.randint(0, 1000, (B, 4))
def bench(f, *a, n=300):
    for _ in range(20): f(*a)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n): f(*a)
        ts.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(ts)
with torch.no_grad():
    tr = ST.StaticSteps._trunk
    print("eager trunk T=1 us", bench(lambda: tr(S, ids, lengths)))
    print("eager trunk T=4 us", bench(lambda: tr(S, draft, lengths)))
    print("eager greedy us", bench(lambda: S.greedy(ids, lengths)))
    print("eager verify us", bench(lambda: S.verify(draft, lengths)))
    import torch._inductor.config as IC
    if len(sys.argv) > 2: IC.cpp_wrapper = True
    c = torch.compile(tr, dynamic=False)
    print("compiled trunk T=1 us", bench(lambda: c(S, ids, lengths)))
    print("compiled trunk T=4 us", bench(lambda: c(S, draft, lengths)))
    ST.StaticSteps._trunk = c
    print("greedy w/ compiled trunk us", bench(lambda: S.greedy(ids, lengths)))
    print("verify w/ compiled trunk us", bench(lambda: S.verify(draft, lengths)))
