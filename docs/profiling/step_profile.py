"""Where does the 30B step spend its time: a torch.profiler kernel table of a 4-layer LLaMA-30B-shape step at
the full-set batch shape, then attention / RoPE / SwiGLU microbenchmarks (docs/benchmarks.md, 2026-11-29).
Run on a GPU machine from the repository root: PYTHONPATH=. python3 docs/profiling/step_profile.py bf16 fp8"""
import sys

from common import cuda_ms, hellaswag_requests, print_kernel_table  # also puts the repository on sys.path
import torch, torch.nn.functional as F
from dataclasses import replace
from runtime.bench import SHAPES, random_model
from runtime.packed import PackedScorer, attention_mask
import runtime.packed as P
from runtime.model import apply_rope
from torch.nn.attention import sdpa_kernel, SDPBackend

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
reqs = hellaswag_requests(1500)
bench = cuda_ms
rows = []
args4 = replace(SHAPES["llama-30b"], n_layers=4)
for prec in sys.argv[1:]:
    torch._dynamo.reset()
    model = random_model(args4, torch.bfloat16, dev, scheme=None if prec == "bf16" else prec)
    sc = PackedScorer(model, dev, row_len=448, rows_per_batch=36)
    bt = sc.prepare(reqs)
    step = torch.compile(lambda *a: P.packed_step(model, *a), fullgraph=True, dynamic=False)
    a0 = (bt.tokens[0], bt.positions[0], bt.subtree_end[0], bt.target_index[0], bt.target_ids[0])
    with torch.inference_mode():
        print_kernel_table(step, a0, f"{prec}, 4 layers", steps=5, top=22)
    del model, sc, step
    torch.cuda.empty_cache()

# microbenchmarks at the full-set shape
B, T, H, D = 36, 448, 52, 128
sc = PackedScorer(None, dev, row_len=448, rows_per_batch=36)
bt = sc.prepare(reqs)
end = bt.subtree_end[1]; pos = bt.positions[1]
from runtime.model import rope_tables
cos, sin = rope_tables(D, 4096, 10000.0); cos, sin = cos.to(dev)[pos], sin.to(dev)[pos]
x = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
r1 = torch.compile(lambda x: apply_rope(x, cos, sin))
rows.append(("rope interleaved, compiled, [B,T,H,D]->same", bench(lambda: r1(x))))
r1t = torch.compile(lambda x: apply_rope(x, cos, sin).transpose(1, 2).contiguous())
rows.append(("rope interleaved + transpose to [B,H,T,D]", bench(lambda: r1t(x))))
def rope_half(x, cos, sin):
    xf = x.float(); x0, x1 = xf[..., :D // 2], xf[..., D // 2:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).type_as(x)
r2 = torch.compile(lambda x: rope_half(x, cos, sin))
rows.append(("rope half-split, compiled", bench(lambda: r2(x))))
rows.append(("copy of q (read+write)", bench(lambda: x.clone())))
q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
m = attention_mask(end)
fm = torch.zeros(m.shape, dtype=torch.bfloat16, device=dev).masked_fill_(~m, float("-inf"))  # additive
for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
    for mn, mm in (("bool", m), ("bf16", fm)):
        try:
            with sdpa_kernel(be):
                rows.append((f"sdpa {name} {mn} mask", bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mm))))
        except Exception as e:
            rows.append((f"sdpa {name} {mn} mask FAILED {str(e)[:80]}", 0))
qt = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    rows.append(("sdpa cudnn bool mask, q as transposed view", bench(lambda: F.scaled_dot_product_attention(qt, qt, qt, attn_mask=m))))
rows.append(("flash causal (lower bound)", bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))))
rows.append(("mask build", bench(lambda: attention_mask(end))))
h = torch.randn(B * T, 17920, device=dev, dtype=torch.bfloat16)
sm = torch.compile(lambda a, b: F.silu(a) * b)
rows.append(("silu*mul [16128,17920]", bench(lambda: sm(h, h))))
print("\n| what | ms |\n|---|---|")
for r in rows: print(f"| {r[0]} | {r[1]:.3f} |")
