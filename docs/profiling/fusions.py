"""The fused SwiGLU + per-token quantization kernel (runtime/kernels.py), fp8 products with and without
fast accumulation (`accum`), the LM head as a bf16 product with fp32 output, and FlexAttention block
sizes, against what the runtime did before, at the LLaMA-30B full-set batch shape [36 x 448]
(their results: docs/benchmarks.md and its history in git).
`steps` times 4-layer compiled steps (bf16 and fp8 under some inductor settings; fp8 with fast
accumulation), checks each against the eager SDPA path and prints kernel tables.
On a GPU machine from the repository root: PYTHONPATH=. python3 docs/profiling/fusions.py [micro] [accum] [head] [attention] [steps]
(rows print as they are measured: keep the lines starting with "|" when filtering the output)"""
import sys
from dataclasses import replace

from common import cuda_ms, hellaswag_requests, print_kernel_table  # also puts the repository on sys.path
import torch
import torch.nn.functional as F

import runtime.packed as P
from runtime import kernels
from runtime.bench import SHAPES, random_model
from runtime.quant import SCALE_FLOOR, _quantize_rows, SCHEMES, QuantLinear, scheme_for
from runtime.packed import PackedScorer, attention_mask

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
class Rows(list):
    def append(self, row):  # print as it goes: a crash later must not lose what was measured
        print(f"| {row[0]} | {row[1]:.3f} |", flush=True)
        super().append(row)


rows = Rows()
parts = sys.argv[1:] or ["micro", "accum", "head", "attention", "steps"]
reqs = hellaswag_requests(1500)

if "micro" in parts:
    M, N = 16128, 17920
    g = torch.Generator(device=dev).manual_seed(0)
    a = (torch.randn(M, N, device=dev, generator=g) * 2).bfloat16()
    b = torch.randn(M, N, device=dev, generator=g).bfloat16()
    a[5] = 0  # a zero row: scale floor, q exactly 0
    for name in ("fp8", "int8"):
        scheme = SCHEMES[name]()
        ref_q, ref_s = _quantize_rows(F.silu(a) * b, scheme)
        comp = torch.compile(lambda a, b: _quantize_rows(F.silu(a) * b, scheme))
        rows.append((f"{name} silu*mul+quant, inductor", cuda_ms(lambda: comp(a, b))))
        for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
            fn = lambda: kernels.swiglu_quantize_cuda(a, b, scheme.weight_dtype, scheme.qmax, SCALE_FLOOR,
                                                      block, warps)
            q, s = fn()
            bad = (q.float() != ref_q.float()).float().mean().item()
            steps = ((q.float() - ref_q.float()).abs() / torch.where(ref_q.float() == 0, 1.0, ref_q.float().abs())).max().item()
            srel = ((s - ref_s).abs() / ref_s).max().item()
            rows.append((f"{name} triton block={block} warps={warps} (q differs {bad:.2e}, "
                         f"max rel {steps:.2e}, scale rel {srel:.1e})", cuda_ms(fn)))
    rows.append(("copy of one [16128, 17920] bf16 (read+write)", cuda_ms(lambda: a.clone())))
    del a, b

if "accum" in parts:  # fp8 row-wise _scaled_mm with and without fast accumulation, 30B shapes
    M = 16128
    g = torch.Generator(device=dev).manual_seed(1)
    fp8 = SCHEMES["fp8"]()
    for name, K, N in (("wq", 6656, 6656), ("w1", 6656, 17920), ("w2", 17920, 6656)):
        x = torch.randn(M, K, device=dev, generator=g).bfloat16()
        w = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).bfloat16()
        q, qs = _quantize_rows(x, fp8)
        wq, ws = _quantize_rows(w, fp8)
        # the exact product of the quantized values (fp64), and the bf16 product (quantization's size)
        exact = (q.double() * qs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).t()
        rms = exact.pow(2).mean().sqrt().item()
        bf = (x @ w.t()).double()
        flops = 2 * M * K * N
        rows.append((f"{name} bf16 mm ({flops / cuda_ms(lambda: x @ w.t()) / 1e9:.0f} TFLOP/s)",
                     cuda_ms(lambda: x @ w.t())))
        rows.append((f"{name} fp8 quantization error vs bf16 product: rms/rms(out) "
                     f"{((exact - bf).pow(2).mean().sqrt() / rms).item():.1e}", 0.0))
        for fast in (False, True):
            mm = lambda: torch._scaled_mm(q, wq.t(), scale_a=qs[:, None].contiguous(), scale_b=ws[None, :].contiguous(),
                                          out_dtype=torch.bfloat16, use_fast_accum=fast)
            d = (mm().double() - exact)
            t = cuda_ms(mm)
            rows.append((f"{name} fp8 rowwise fast_accum={fast} ({flops / t / 1e9:.0f} TFLOP/s; vs exact: "
                         f"rms {(d.pow(2).mean().sqrt() / rms).item():.1e}, max {(d.abs().max() / rms).item():.1e} of rms(out))", t))
        del x, w, q, wq, exact, bf, d
    torch.cuda.empty_cache()

if "head" in parts:  # LM head at the scored positions of one batch
    n_t = 11776
    h = torch.randn(n_t, 6656, device=dev).bfloat16()
    w = (torch.randn(32000, 6656, device=dev) / 80).bfloat16()
    w32 = w.float()
    t = torch.randint(0, 32000, (n_t,), device=dev)
    def lp(logits):
        return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    old = torch.compile(lambda h: lp(F.linear(h.float(), w32)))
    new = torch.compile(lambda h: lp(torch.mm(h, w.t(), out_dtype=torch.float32)))
    ref = lp(F.linear(h.double(), w.double()))
    rows.append((f"LM head fp32 (tf32) (max |dlogp| vs fp64 {(old(h) - ref).abs().max().item():.1e})", cuda_ms(lambda: old(h))))
    rows.append((f"LM head bf16 mm, fp32 out (max |dlogp| vs fp64 {(new(h) - ref).abs().max().item():.1e})", cuda_ms(lambda: new(h))))
    del h, w, w32

if "attention" in parts:  # attention on a real packed batch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    sc = PackedScorer(None, dev, row_len=448, rows_per_batch=36)
    bt = sc.prepare(reqs)
    end, slot = bt.subtree_end[1], bt.slot[1].to(dev)
    B, T, H, D = 36, 448, 52, 128
    qkv = [torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    mask = attention_mask(end)
    ref = F.scaled_dot_product_attention(*qkv, attn_mask=mask)
    real = (slot != -1)[:, None, :, None]
    rows.append(("attention sdpa, bool tree mask", cuda_ms(lambda: F.scaled_dot_product_attention(*qkv, attn_mask=mask))))
    fa = torch.compile(flex_attention)
    flat_end = (end + torch.arange(B, device=dev)[:, None] * T).reshape(1, -1)
    flat = [x.transpose(1, 2).reshape(1, B * T, H, D).transpose(1, 2) for x in qkv]
    for layout in ("rows", "flat"):
        for bs in (128, 64):
            try:
                if layout == "rows":
                    mm = lambda bb, hh, qi, ki: (ki <= qi) & (qi < end[bb, ki])
                    bm = create_block_mask(mm, B, None, T, T, device=dev, BLOCK_SIZE=bs)
                    args = qkv
                else:
                    mm = lambda bb, hh, qi, ki: (ki <= qi) & (qi < flat_end[bb, ki])
                    bm = create_block_mask(mm, 1, None, B * T, B * T, device=dev, BLOCK_SIZE=bs)
                    args = flat
                opts = {"BLOCK_M": bs, "BLOCK_N": bs} if bs != 128 else None
                out = fa(*args, block_mask=bm, kernel_options=opts)
                if layout == "flat":
                    out = out.transpose(1, 2).reshape(B, T, H, D).transpose(1, 2)
                err = ((out - ref).abs() * real).max().item()
                rows.append((f"flex {layout} block {bs} (sparsity {bm.sparsity():.0f}%, max diff {err:.1e})",
                             cuda_ms(lambda: fa(*args, block_mask=bm, kernel_options=opts))))
            except Exception as e:  # report and go on: this is a survey
                rows.append((f"flex {layout} block {bs} FAILED {type(e).__name__}: {str(e)[:120]}", 0.0))

if "steps" in parts:
    args4 = replace(SHAPES["llama-30b"], n_layers=4)
    fused = kernels.fused_swiglu_available
    # Inductor settings tried on top of the defaults. multi_kernel: inductor also builds persistent (one
    # read per row) versions of the norm and quantization reductions over 6,656 columns, which its
    # default threshold (1,024 columns) leaves looped, and keeps whichever is faster.
    # coordinate_descent_tuning: tunes the block sizes of the pointwise and reduction kernels.
    MK, CDT = {"triton.multi_kernel": 1}, {"coordinate_descent_tuning": True}
    # (precision, fused SwiGLU kernel, inductor settings, fp8 fast accumulation)
    variants = [("bf16", False, {}, False), ("bf16", False, MK, False), ("bf16", False, CDT, False),
                ("fp8", True, {}, False), ("fp8", True, MK, False), ("fp8", True, CDT, False), ("fp8", True, {}, True)]

    def run_variant(prec, use_fused, settings, fast):
        torch._dynamo.reset()
        kernels.fused_swiglu_available = fused if use_fused else (lambda a: False)
        scheme = None if prec == "bf16" else scheme_for(prec, fast)
        model = random_model(args4, torch.bfloat16, dev, scheme=scheme)
        sc = PackedScorer(model, dev, row_len=448, rows_per_batch=36, compile=True)
        bt = sc.prepare(reqs)
        step = sc.step  # compiled, CUDA graphs
        a0 = sc._step_args(bt, 0)
        with torch.inference_mode():
            for _ in range(3):
                step(*a0)
            ms = cuda_ms(lambda: step(*a0), n=10)
            got = step(*a0).clone()
            if fast:  # the reference: the same weights, partial sums promoted to fp32
                for m in model.modules():
                    if isinstance(m, QuantLinear):
                        m.scheme = SCHEMES["fp8"]()
            kernels.fused_swiglu_available = lambda a: False
            ref = P.packed_step(model, *a0)  # eager, SDPA with the dense mask, torch SwiGLU
            kernels.fused_swiglu_available = fused if use_fused else (lambda a: False)
            d = (got - ref).abs()
            rows.append((f"step 4 layers {prec} fused swiglu={use_fused} {settings or ''} {'fast accum' if fast else ''}"
                         f"(|d logp| vs eager sdpa: mean {d.mean().item():.1e} max {d.max().item():.1e})", ms))
            if settings or fast or prec == "bf16":
                eager_step = torch.compile(lambda *a: P.packed_step(model, *a), fullgraph=True, dynamic=False)
                print_kernel_table(eager_step, a0, f"{prec} fused={use_fused} {settings or ''}, 4 layers")

    for prec, use_fused, settings, fast in variants:
        with torch._inductor.config.patch(settings):
            run_variant(prec, use_fused, settings, fast)
        torch.cuda.empty_cache()  # the variant's model is gone with its frame
    kernels.fused_swiglu_available = fused

print("\n| what | ms |\n|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.3f} |")
