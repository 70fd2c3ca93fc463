"""How often shortlist sampling (vlm_dist/infer/shortlist_sampling.py) needs a row's full logits: B+ / (A + B+) over
the states of a sampling decode (16 demo scenes, temperature 0.7), and the certificate's gap (best shortlist logit
minus the bound on the others).    python docs/bench/issue9_round12/outside_mass.py EXPORT"""
import sys, torch
sys.path.insert(0, "/work/main/tools")
from bench_decode import load_images
from vlm_dist.infer.load import load_exported
from vlm_dist.infer.generate import generate
from vlm_dist.text import get_tokenizer, prompt_tokens
import torch.nn.functional as F
model, cfg = load_exported(sys.argv[1])
images = load_images(model, None, 16)
prompt = prompt_tokens(get_tokenizer())
tab = model.argmax_table()
states = []
# the normalised state each sampling step draws from: the final norm's output at the last fed position
h = model.norm.register_forward_hook(lambda m, i, o: states.append(o[:, -1].detach()))
g = torch.Generator().manual_seed(0)
generate(model, images, [prompt] * 16, 24, temperature=0.7, generator=g)
h.remove()
X = torch.cat(states)
W = model.lm_head.weight
full = X @ W.T
s = F.linear(X, tab.table)
best = s[:, :-1].max(1).values
U = s[:, -1] + tab.slack * X.norm(dim=1)   # bound on outside logits
outside = torch.ones(W.shape[0], dtype=torch.bool); outside[tab.ids] = False
true_out_max = full[:, outside].max(1).values
K = tab.ids.numel(); V = W.shape[0]
for T in (0.7, 1.0):
    A = torch.exp((s[:, :-1] - best[:, None]) / T).sum(1)
    Bup = (V - K) * torch.exp((U - best) / T)
    Btrue = torch.exp((full[:, outside] - best[:, None]) / T).sum(1)
    print(f"T={T}: rows {len(X)}, K={K}; P(full path) = Bup/(A+Bup): median {(Bup/(A+Bup)).median():.3g}, mean {(Bup/(A+Bup)).mean():.3g}, max {(Bup/(A+Bup)).max():.3g}; true outside mass mean {(Btrue/(A+Btrue)).mean():.3g}")
print("gap best - U: min %.2f median %.2f" % ((best - U).min(), (best - U).median()), "; best - true outside max: median %.2f" % (best - true_out_max).median())
