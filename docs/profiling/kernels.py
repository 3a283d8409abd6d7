"""GEMM rates of the LLaMA-30B linear shapes (bf16, fp8 rowwise, int8), attention on real packed batches
(SDPA with the tree mask, FlexAttention with a block mask), and a kernel table of a 4-layer step
(docs/benchmarks.md, 2026-11-29). From the repository root on a GPU machine:
PYTHONPATH=. python3 docs/profiling/kernels.py"""
import sys, time
import torch, torch.nn.functional as F
from dataclasses import replace
sys.path.insert(0, ".")
from runtime.bench import SHAPES, random_model, flops_per_token
from runtime.hellaswag import load_items
from runtime.tokenizer import Tokenizer
from runtime.scoring import build_requests
from runtime.packed import PackedScorer, attention_mask
import runtime.packed as P

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
rows = []
def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts)//2]

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
items, _ = load_items("shared/data/hellaswag_val_full.txt.bz2")
tok = Tokenizer("sentencepiece", "shared/data/llama-tokenizer.model", None, None)
reqs = build_requests(items, tok, add_bos=True)
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

# 3. 4-layer step, compiled, time per batch
args4 = replace(args, n_layers=4)
model = random_model(args4, torch.bfloat16, dev)
sc = PackedScorer(model, dev, batch_tokens=16384, compile=True)
bt = sc.prepare(reqs[:4*2000])
t0 = time.perf_counter(); sc.warmup(bt); w = time.perf_counter() - t0
torch.cuda.synchronize(); t0 = time.perf_counter(); sc.score(bt); torch.cuda.synchronize()
per = (time.perf_counter() - t0) / bt.tokens.shape[0]
rows.append((f"4-layer step reduce-overhead shape={list(bt.shape)} warm={w:.0f}s", per*1e3, sum(bt.real_tokens)/bt.tokens.shape[0]*flops_per_token(args4, bt.shape[1]/2)/per/1e12*1e3))
# profile a default-mode compile for the kernel breakdown
step = torch.compile(lambda *a: P.packed_step(model, *a), fullgraph=True, dynamic=False)
a0 = (bt.tokens[0], bt.positions[0], bt.subtree_end[0], bt.target_index[0], bt.target_ids[0])
with torch.inference_mode():
    for _ in range(3): step(*a0)
    torch.cuda.synchronize()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): step(*a0)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
print("\n| what | ms | TFLOP/s |\n|---|---|---|")
for r in rows: print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} |")
