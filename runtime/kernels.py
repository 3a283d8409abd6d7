"""Hand-written GPU kernels for what torch.compile does not fuse well. Each one has a plain torch
reference that runs everywhere else (CPU, older GPUs, no Triton) and that the kernel matches up to
the rounding stated with it; the reference lives next to its caller (runtime/quant.py), the GPU
tests compare the two (tests/test_gpu.py).

swiglu_quantize_cuda: w2's input in an fp8/int8 model is silu(w1 x) * (w3 x), quantized per token,
in one kernel: faster than the same torch ops compiled by inductor (docs/benchmarks.md). One program
per token row: one pass for the row's
abs-max, a second that quantizes, re-reading the row mostly from L2. Both passes are bound by
arithmetic as much as by memory, hence the hardware exp2 and reciprocal (see _swiglu_block).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU wheels do without it (and without this kernel).
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

if triton is not None:
    @triton.jit
    def _swiglu_block(a_row, b_row, cols, mask):
        """silu(a) * b for one block of a row, rounded as eager torch rounds it: silu's result to the
        input dtype, then the product (values returned in fp32). The hardware exp2 and division
        behind tl.sigmoid differ from torch's correctly rounded ones in the last fp32 bit, which
        changes the rounded result only at a rounding tie (rare: tests/test_gpu.py bounds it)."""
        dt = a_row.dtype.element_ty
        a = tl.load(a_row + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_row + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(dt).to(tl.float32)
        return (silu * b).to(dt).to(tl.float32)

    @triton.jit
    def _swiglu_quantize_kernel(a_ptr, b_ptr, q_ptr, scale_ptr, n_cols, qmax: tl.constexpr,
                                scale_floor: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        # qmax and scale_floor are compile-time constants (fixed per scheme): passed as runtime
        # floats, inductor would hand them over as fp64.
        row = tl.program_id(0).to(tl.int64)
        a_row, b_row, q_row = a_ptr + row * n_cols, b_ptr + row * n_cols, q_ptr + row * n_cols
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_swiglu_block(a_row, b_row, cols, cols < n_cols)))
        scale = tl.maximum(tl.max(amax, axis=0) / qmax, scale_floor)
        inv_scale = 1.0 / scale
        for start in range(0, n_cols, BLOCK):  # the row again, mostly from L2
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            q = _swiglu_block(a_row, b_row, cols, mask) * inv_scale
            q = tl.minimum(tl.maximum(q, -qmax), qmax)
            if ROUND:
                q = libdevice.rint(q)  # half to even, as torch.round
            tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def fused_swiglu_available(a: torch.Tensor) -> bool:
    return triton is not None and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)


def swiglu_quantize_cuda(a: torch.Tensor, b: torch.Tensor, qdtype: torch.dtype, qmax: float,
                         scale_floor: float, block: int = 2048, num_warps: int = 8
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(a) * b rounded to a's dtype, then quantized per row (scale = max|row| / qmax, floored;
    q = row * (1 / scale) clamped to +-qmax, rounded half to even for int8, cast for e4m3), in one
    kernel. a, b: [M, N] bf16/fp16 on CUDA. Returns q [M, N] in qdtype and scale [M] fp32.
    block/num_warps: 2048/8 was the fastest of those tried for LLaMA-30B (docs/profiling/fusions.py)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"swiglu_quantize wants two [M, N] inputs, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    M, N = a.shape
    q = torch.empty((M, N), dtype=qdtype, device=a.device)
    scale = torch.empty(M, dtype=torch.float32, device=a.device)
    _swiglu_quantize_kernel[(M,)](a, b, q, scale, N, qmax, scale_floor, ROUND=qdtype == torch.int8,
                                  BLOCK=block, num_warps=num_warps)
    return q, scale
