"""Packed layouts on the GPU: rows (trees first-fit into [36 x 448], dense-mask SDPA) against flat (one
8k-token tree per row, [2 x 8,064], FlexAttention with the tree's block mask), 4-layer LLaMA-30B-shape steps at the
full set's batch shape; ms per batch, the implied 60-layer full-set time, the attention kernels' share,
and how far the two layouts' scores are apart.

  PYTHONPATH=. python3 docs/profiling/layouts.py bf16:rows bf16:flat bf16:flat:128 fp8:rows fp8:flat
(precision:layout[:key block], default runtime.packed.flex_kv_block; fp8 with fast accumulation; a kernel
table for the first variant of each layout)"""
import sys, time
from dataclasses import replace

from common import hellaswag_requests, print_kernel_table  # also puts the repository on sys.path
import torch

import runtime.packed as P
from runtime.bench import SHAPES, random_model
from runtime.packed import PackedScorer, flex_kv_block
from runtime.quant import scheme_for

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
reqs = hellaswag_requests()
sub = reqs[:4 * 1500]
args4 = replace(SHAPES["llama-30b"], n_layers=4)
full = {}
for layout in ("rows", "flat"):
    t0 = time.perf_counter()
    b = PackedScorer(None, dev, compile=True, layout=layout).prepare(reqs)
    full[layout] = b
    print(f"full set, {layout}: shape {list(b.shape)} x {b.tokens.shape[0]} batches = "
          f"{b.tokens.shape[0] * b.tokens.shape[1] * b.tokens.shape[2]:,} slots, {sum(b.real_tokens):,} tokens, "
          f"{b.attended_keys() / sum(b.real_tokens):.1f} keys a token; packed in {time.perf_counter() - t0:.1f} s", flush=True)
table, scores, tabled = [], {}, set()
for spec in sys.argv[1:]:
    precision, layout, *blocks = spec.split(":")
    kv_block = int(blocks[0]) if blocks else None
    P.flex_kv_block = (lambda head_dim: kv_block) if kv_block else flex_kv_block
    torch._dynamo.reset()
    try:
        scheme = None if precision == "bf16" else scheme_for(precision, precision == "fp8")
        model = random_model(args4, torch.bfloat16, dev, seed=0, scheme=scheme)
        fb = full[layout]
        sc = PackedScorer(model, dev, row_len=fb.shape[1], rows_per_batch=fb.shape[0], compile=True, layout=layout)
        bt = sc.prepare(sub, like=fb)
        t0 = time.perf_counter(); sc.warmup(bt); warm = time.perf_counter() - t0
        for _ in range(2):
            torch.cuda.synchronize(); t0 = time.perf_counter(); got = sc.score(bt); torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / bt.tokens.shape[0]
        scores[spec] = torch.tensor(got, dtype=torch.float64)
        n_full = fb.tokens.shape[0]
        table.append((spec, per * 1e3, warm, per * 1e3 / 4 * 60 * n_full / 1e3, n_full))
        print(table[-1], flush=True)
        if layout not in tabled:
            tabled.add(layout)
            with torch.inference_mode():
                print_kernel_table(sc.step, sc._step_args(bt, 0), f"{spec}, 4 layers", top=16)
        del model, sc, bt
    except Exception as e:
        print("FAILED", spec, type(e).__name__, str(e)[:400], flush=True)
    torch.cuda.empty_cache()
print("\n| variant | batches (full set) | ms/batch, 4 layers | warm-up s | full set, 60 layers, est. s |\n|---|---|---|---|---|")
for r in table:
    print(f"| {r[0]} | {r[4]} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.0f} |")
for prec in ("bf16", "fp8"):
    names = [k for k in scores if k.startswith(prec + ":")]
    for other in names[1:]:
        d = (scores[other] - scores[names[0]]).abs()
        print(f"{prec}: |{other} - {names[0]}| mean {d.mean():.2e} max {d.max():.2e} over {len(d)} endings")
