"""GEMM rates of the LLaMA-30B linear shapes (bf16, fp8 rowwise, int8), attention on real packed batches
(SDPA with the tree mask, FlexAttention with a block mask)
(docs/benchmarks.md, 2026-11-29; a step's kernel table is step_profile.py). On a GPU machine:
python3 docs/profiling/kernels.py"""
from common import cuda_ms, hellaswag_requests  # also puts the repository on sys.path
import torch, torch.nn.functional as F
from runtime.bench import SHAPES
from runtime.packed import PackedScorer, attention_mask

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
rows = []
bench = cuda_ms

# 1. GEMM rates per linear at M = 16128 (36 x 448)
M_ = 16128
for name, k, n in [("wq", 6656, 6656), ("wqkv", 6656, 19968), ("w1", 6656, 17920), ("w13", 6656, 35840), ("w2", 17920, 6656), ("wo", 6656, 6656)]:
    a = torch.randn(M_, k, device=dev, dtype=torch.bfloat16); w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: F.linear(a, w))
    rows.append((f"gemm {name} [{M_}x{k}]x[{k}x{n}]", ms, 2*M_*k*n/ms/1e9))
    # fp8 rowwise
    a8 = a.to(torch.float8_e4m3fn); w8 = w.to(torch.float8_e4m3fn)
    sa = torch.ones(M_, 1, device=dev); sb = torch.ones(1, n, device=dev)
    ms = bench(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    rows.append((f"fp8 {name}", ms, 2*M_*k*n/ms/1e9))
    ai = a.clamp(-100, 100).to(torch.int8); wi = w.clamp(-100,100).to(torch.int8)
    ms = bench(lambda: torch._int_mm(ai, wi.t()))
    rows.append((f"int8 {name}", ms, 2*M_*k*n/ms/1e9))
    del a, w, a8, w8, ai, wi

# 2. attention on one real packed batch: dense mask SDPA vs flex
args = SHAPES["llama-30b"]
reqs = hellaswag_requests()
for row_len in (448, 512):
    sc = PackedScorer(None, dev, row_len=row_len, batch_tokens=16384)
    bt = sc.prepare(reqs[:4*600])
    slot, end = bt.slot[1], bt.subtree_end[1]
    B, T = slot.shape
    q = torch.randn(B, 52, T, 128, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
    mask = attention_mask(end)
    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    fl = 4*B*T*T*52*128/2
    rows.append((f"sdpa dense-mask T={T} B={B}", ms, fl/ms/1e9))
    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rows.append((f"sdpa causal(flash) T={T}", ms, fl/ms/1e9))
    try:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask
        def mask_mod(b, h, qi, ki):  # the tree mask: ki is qi or an ancestor of qi
            return (ki <= qi) & (qi < end[b, ki])
        bm = create_block_mask(mask_mod, B, None, T, T, device=dev)
        fa = torch.compile(flex_attention)
        ms = bench(lambda: fa(q, k, v, block_mask=bm))
        rows.append((f"flex T={T} sparsity={bm.sparsity():.0f}%", ms, fl/ms/1e9))
        bmc = torch.compile(lambda e: create_block_mask(lambda bb, h, qi, ki: (ki <= qi) & (qi < e[bb, ki]), B, None, T, T, device=dev))
        ms = bench(lambda: bmc(end))
        rows.append((f"create_block_mask compiled T={T}", ms, 0))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = fa(q, k, v, block_mask=bm)
        real = (slot != -1)[:, None, :, None]
        rows.append((f"flex vs sdpa max diff (real tokens) T={T}", float(((got-ref).abs()*real).max()), 0))
    except Exception as e:
        rows.append((f"flex failed: {type(e).__name__}: {str(e)[:200]}", 0, 0))
    del q, k, v

print("\n| what | ms | TFLOP/s |\n|---|---|---|")
for r in rows: print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} |")
