"""4-layer LLaMA-30B-shape step variants on the full-set batch shape; ms per batch and the implied full-set time."""
import sys, time
from common import hellaswag_requests  # also puts the repository on sys.path
import torch
from dataclasses import replace
from runtime.bench import SHAPES, random_model
from runtime.packed import PackedScorer
import runtime.packed as P

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
reqs = hellaswag_requests()
full = PackedScorer(None, dev, batch_tokens=16384)
fb = full.prepare(reqs)
n_full = fb.tokens.shape[0]
print("full set:", list(fb.shape), "batches", n_full, "tokens", sum(fb.real_tokens), flush=True)
sub = reqs[:4 * 1500]
args4 = replace(SHAPES["llama-30b"], n_layers=4)
rows = []
orig_mask = P.attention_mask
def run(name, precision="bf16", mode="reduce-overhead", float_mask=False):
    torch._dynamo.reset()
    P.attention_mask = (lambda e, dtype=None: orig_mask(e, torch.bfloat16)) if float_mask else orig_mask
    model = random_model(args4, torch.bfloat16, dev, scheme=None if precision == "bf16" else precision)
    sc = PackedScorer(model, dev, row_len=fb.shape[1], rows_per_batch=fb.shape[0], compile=True)
    if mode != "reduce-overhead":
        sc.step = torch.compile(lambda *a: P.packed_step(model, *a), mode=mode, fullgraph=True, dynamic=False)
    bt = sc.prepare(sub, like=fb)
    t0 = time.perf_counter(); sc.warmup(bt); w = time.perf_counter() - t0
    for rep in range(2):
        torch.cuda.synchronize(); t0 = time.perf_counter(); sc.score(bt); torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / bt.tokens.shape[0]
    # 60 layers: per-layer cost x 60 + the head/embedding part (measured with the 4 layers, small)
    rows.append((name, per * 1e3, w, per * 1e3 / 4 * 60 * n_full / 1e3))
    print(rows[-1], flush=True)
    del model, sc, bt
    torch.cuda.empty_cache()

for spec in sys.argv[1:]:
    name, prec, mode, fm = spec.split(":")
    try:
        run(name, prec, mode, fm == "1")
    except Exception as e:
        print("FAILED", name, type(e).__name__, str(e)[:300], flush=True)
print("\n| variant | ms/batch (4 layers) | warm-up s | full set, 60 layers, est. s |\n|---|---|---|---|")
for r in rows: print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.0f} |")
