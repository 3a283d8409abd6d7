"""Quantized linears: the schemes an artifact can be compiled to, and the module that runs them.

Three schemes, each a frozen, versioned dataclass named after both operands, and chosen per target
by the planner (the runtime only reads the choice from the manifest):

    "fp8"   Float8WeightFloat8Activation  e4m3 weights, one scale per output row; activations
            quantized to e4m3 per token at run time. torch._scaled_mm with row-wise scales on
            CUDA sm_89+ (Ada, Hopper); elsewhere an emulation, below.
    "int8"  Int8WeightInt8Activation      symmetric int8 weights per output row, int8 activations
            per token at run time; torch._int_mm (int32 accumulation) then one fp32 rescale.
    "w8"    Int8WeightOnly                int8 weights per output row, dequantized to the compute
            dtype (fp16/bf16) before F.linear: for V100, which has no int8/fp8 matrix units.

Symmetric quantization throughout: q = round(x / scale) clamped to [-qmax, qmax], scale = amax / qmax
in fp32 (qmax = 127 for int8, 448 for e4m3), so dequantization is q * scale and zero stays zero.

A quantized linear replaces an nn.Linear whose weight is [out, in]. Its state dict holds
`<linear>.qdata` ([out, in], int8 or float8_e4m3fn) and `<linear>.scale` ([out], fp32); SmoothQuant's
factors are folded into the weights at compile time (toolchain/smoothquant.py). Loading follows the rest of the
runtime: empty modules on the meta device (`swap_linears` on a meta model), then
`load_state_dict(strict=True, assign=True)`.

The LM head and the embeddings stay in floating point: the default filter swaps only the seven
linears of each transformer block (wq wk wv wo w1 w2 w3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from runtime import kernels

# A zero row (or token) would give scale 0 and 0/0 on quantization. Any positive floor keeps it at
# exactly zero; 1e-12 also keeps 1/scale finite and a product of two scales (~1e-24) a normal fp32.
SCALE_FLOOR = 1e-12

# torch._int_mm on CUDA (cuBLASLt) wants more than 16 rows and K, N multiples of 8. Fewer rows are
# padded with zero rows up to 24 (the first multiple of 8 past 16) and the padding is cut off after.
INT_MM_MIN_ROWS = 17
INT_MM_PAD_ROWS = 24


# Which elements share one scale: the only choice of every scheme, written in the manifest so that a
# reader knows what the stored scales mean.
WEIGHT_GRANULARITY = "per_row"  # one scale per row of a weight [out, in]: per output channel
ACTIVATION_GRANULARITY = "per_token"  # one scale per row of an activation [tokens, in], computed at run time


SCHEME_VERSION = 1  # bump when the meaning of the stored tensors changes


@dataclass(frozen=True)
class _Scheme:
    """Fields common to all schemes; subclasses fix the dtypes and the kernel (class variables)."""

    name: ClassVar[str]
    weight_dtype: ClassVar[torch.dtype]
    qmax: ClassVar[float]  # largest magnitude of the quantized type that is used
    dim_multiple: ClassVar[int]  # in/out features must be multiples of this (the GPU kernel's rule)
    quantizes_activations: ClassVar[bool]

    version: int = SCHEME_VERSION

    def __post_init__(self):
        if self.version != SCHEME_VERSION:
            raise ValueError(f"unknown version {self.version!r} of quantization scheme {self.name!r}; "
                             f"this hsc reads version {SCHEME_VERSION} (recompile the artifact with this hsc)")

    def check_shape(self, in_features: int, out_features: int) -> None:
        bad = [f"{n}={v}" for n, v in (("in_features", in_features), ("out_features", out_features))
               if v % self.dim_multiple]
        if bad:
            raise ValueError(f"scheme {self.name!r} needs in/out features that are multiples of "
                             f"{self.dim_multiple} (the GPU kernel's rule), got {', '.join(bad)}")

    def describe(self) -> str:
        act = (f"{self.weight_dtype_name} per-token dynamic" if self.quantizes_activations
               else "compute dtype")
        return f"{self.name} ({type(self).__name__}: weight {self.weight_dtype_name} per-row, activation {act})"

    def product_options(self) -> dict:
        """Keyword arguments of this scheme's matrix product (the _KERNELS / _PRODUCTS functions)."""
        return {}

    @property
    def weight_dtype_name(self) -> str:
        return str(self.weight_dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Float8WeightFloat8Activation(_Scheme):
    name: ClassVar[str] = "fp8"
    weight_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    qmax: ClassVar[float] = 448.0  # torch.finfo(torch.float8_e4m3fn).max
    dim_multiple: ClassVar[int] = 16  # torch._scaled_mm
    quantizes_activations: ClassVar[bool] = True

    # Hopper's fp8 tensor cores sum into an accumulator with fewer bits than fp32; by default
    # torch._scaled_mm moves the partial sums into fp32 registers every few k-steps. True skips that
    # (use_fast_accum): a faster product, with the rounding error docs/benchmarks.md measures. Only the
    # GPU kernel has the option: the CPU emulation sums in fp32 either way.
    fast_accumulation: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.fast_accumulation, bool):
            raise TypeError(f"fast_accumulation must be a bool, got {self.fast_accumulation!r}")

    def describe(self) -> str:
        return super().describe() + (", fast accumulation" if self.fast_accumulation else "")

    def product_options(self) -> dict:
        return {"fast_accum": self.fast_accumulation}


@dataclass(frozen=True)
class Int8WeightInt8Activation(_Scheme):
    name: ClassVar[str] = "int8"
    weight_dtype: ClassVar[torch.dtype] = torch.int8
    qmax: ClassVar[float] = 127.0  # symmetric: -128 is never used
    dim_multiple: ClassVar[int] = 8  # torch._int_mm
    quantizes_activations: ClassVar[bool] = True


@dataclass(frozen=True)
class Int8WeightOnly(_Scheme):
    name: ClassVar[str] = "w8"
    weight_dtype: ClassVar[torch.dtype] = torch.int8
    qmax: ClassVar[float] = 127.0
    dim_multiple: ClassVar[int] = 1  # plain F.linear after dequantization
    quantizes_activations: ClassVar[bool] = False


QuantScheme = Float8WeightFloat8Activation | Int8WeightInt8Activation | Int8WeightOnly
SCHEMES: dict[str, type[_Scheme]] = {
    "fp8": Float8WeightFloat8Activation,
    "int8": Int8WeightInt8Activation,
    "w8": Int8WeightOnly,
}


def scheme_for(precision: str, fast_accum: bool = False) -> QuantScheme:
    """The scheme of a quantized precision ("fp8", "int8", "w8"). fast_accum (fp8's products only:
    int8 accumulates exactly in int32, w8 in the float compute dtype) is refused elsewhere."""
    if fast_accum and precision != "fp8":
        raise ValueError(f"--fast-accum: an option of fp8's products, not of precision {precision}")
    return SCHEMES[precision](fast_accumulation=True) if fast_accum else SCHEMES[precision]()


def scheme_asdict(scheme: _Scheme) -> dict:
    """The manifest's form: {"name": "int8", "version": 1, "weight_granularity": "per_row", ...}."""
    out = {"name": scheme.name, "weight_granularity": WEIGHT_GRANULARITY, "version": scheme.version}
    out.update(_granularities(type(scheme)))
    out.update((f.name, getattr(scheme, f.name)) for f in dataclasses.fields(scheme))
    return out


def _granularities(cls: type[_Scheme]) -> dict[str, str]:
    """The scheme's granularities as the manifest spells them (fixed: see WEIGHT_GRANULARITY)."""
    out = {"weight_granularity": WEIGHT_GRANULARITY}
    if cls.quantizes_activations:
        out["activation_granularity"] = ACTIVATION_GRANULARITY
    return out


def scheme_from_dict(raw: dict) -> _Scheme:
    """Inverse of scheme_asdict; an unknown name, version or field is a ValueError."""
    if not isinstance(raw, dict):
        raise ValueError(f"a quantization scheme must be an object, got {type(raw).__name__}")
    raw = dict(raw)
    name = raw.pop("name", None)
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; this hsc knows {', '.join(SCHEMES)}")
    cls = SCHEMES[name]
    if "version" not in raw:
        raise ValueError(f"quantization scheme {name!r} has no version")
    for key, want in _granularities(cls).items():
        value = raw.pop(key, want)
        if value != want:
            raise ValueError(f"unknown {key} {value!r} in quantization scheme {name!r}; hsc has {want!r} only")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"quantization scheme {name!r} has unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ValueError(f"malformed quantization scheme {name!r}: {e}") from None


# ---- pure quantization functions -------------------------------------------------------------

def _quantize_rows(t: torch.Tensor, scheme: _Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (q [R, C] in scheme.weight_dtype, scale [R] fp32), one symmetric scale per row."""
    tf = t.float()
    scale = (tf.abs().amax(dim=1) / scheme.qmax).clamp_min(SCALE_FLOOR)  # [R]
    q = (tf / scale[:, None]).clamp(-scheme.qmax, scheme.qmax)
    if scheme.weight_dtype == torch.int8:
        q = q.round()  # round half to even, as the cast to e4m3 does
    return q.to(scheme.weight_dtype), scale


def quantize_weight(w: torch.Tensor, scheme: _Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (qdata [out, in], scale [out] fp32): amax/127 (int8) or amax/448 (e4m3) per row."""
    if w.dim() != 2:
        raise ValueError(f"expected a weight [out, in], got shape {tuple(w.shape)}")
    return _quantize_rows(w, scheme)


def dequantize_weight(qdata: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qdata [out, in] * scale [out] in fp32, returned in `dtype` (one rounding)."""
    return (qdata.float() * scale[:, None]).to(dtype)


def quantize_activation_per_token(x: torch.Tensor, scheme: _Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], scale [M] fp32), one scale per token, computed from the data (dynamic)."""
    if not scheme.quantizes_activations:
        raise ValueError(f"scheme {scheme.name!r} keeps activations in floating point")
    if x.dim() != 2:
        raise ValueError(f"expected activations [M, K], got shape {tuple(x.shape)}")
    return _quantize_rows(x, scheme)


# ---- matrix products: x [M, K] in the compute dtype, weight [N, K] -> [M, N] in x's dtype ----------

def int_mm_padded(q: torch.Tensor, qdata: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = q [M, K] @ qdata[N, K].T through torch._int_mm, whose CUDA kernel wants M > 16
    (short inputs get zero rows) and K, N multiples of 8 (checked when the module is built)."""
    M = q.shape[0]
    if M < INT_MM_MIN_ROWS:
        q = F.pad(q, (0, 0, 0, INT_MM_PAD_ROWS - M))  # zero rows: [24, K]
    return torch._int_mm(q, qdata.t())[:M]  # qdata.t() is column-major, as cuBLASLt wants


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8: per-token int8 activations, int32 accumulation (torch._int_mm), fp32 rescale by
    act_scale[:, None] * w_scale[None, :]. Exact integer arithmetic on every device. On the CPU the
    products are summed in fp64 instead (exact too, and much faster than the CPU's _int_mm)."""
    q, a_scale = _quantize_rows(x, _INT8)  # [M, K] int8, [M]
    return int8_product(q, a_scale, qdata, w_scale, x.dtype)


def int8_product(q: torch.Tensor, a_scale: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The matrix product of int8_linear for activations quantized already: q [M, K], a_scale [M]."""
    if q.is_cuda and hasattr(torch, "_int_mm"):
        acc = int_mm_padded(q, qdata).float()
    else:  # fp64 holds every int32 partial sum exactly
        acc = (q.double() @ qdata.double().t()).float()
    return (acc * (a_scale[:, None] * w_scale[None, :])).to(out_dtype)


def _scaled_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def fp8_linear(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor,
               fast_accum: bool = False) -> torch.Tensor:
    """Per-token e4m3 activations times per-row e4m3 weights, row-wise scales (fp8_product)."""
    q, a_scale = _quantize_rows(x, _FP8)  # [M, K] e4m3, [M]
    return fp8_product(q, a_scale, qdata, w_scale, x.dtype, fast_accum)


def fp8_product(q: torch.Tensor, a_scale: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """e4m3 activations q [M, K] with scales a_scale [M] times e4m3 weights qdata [N, K], scales [N].

    On CUDA sm_89+: torch._scaled_mm. Elsewhere (CPU, older GPUs) an emulation with the same
    arithmetic: e4m3 values are exact in fp32 and so are their products (4-bit significands), the
    products are summed in fp32 and the sum is scaled by act_scale * w_scale, as the kernel does. Only
    the order of accumulation differs (and Hopper's fp8 tensor cores keep fewer accumulator bits than
    fp32, the more so with fast_accum), so results agree to the rounding of the sums, then to the
    output dtype."""
    if _scaled_mm_ok(q):
        # Row-wise scaling outputs bf16/fp16 everywhere (fp32 only on sm_90 with cuBLAS >= 12.9).
        mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return torch._scaled_mm(q, qdata.t(), scale_a=a_scale[:, None].contiguous(),
                                scale_b=w_scale[None, :].contiguous(), out_dtype=mm_dtype,
                                use_fast_accum=fast_accum).to(out_dtype)
    acc = q.float() @ qdata.float().t()  # [M, N]
    return (acc * (a_scale[:, None] * w_scale[None, :])).to(out_dtype)


def w8_linear(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Weight-only: dequantize to the compute dtype (q * scale in fp32, rounded once), then F.linear."""
    return F.linear(x, dequantize_weight(qdata, w_scale, x.dtype))


_INT8, _FP8 = Int8WeightInt8Activation(), Float8WeightFloat8Activation()
_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fp8": fp8_linear, "int8": int8_linear, "w8": w8_linear,
}
_PRODUCTS = {"fp8": fp8_product, "int8": int8_product}


def swiglu_quantize(a: torch.Tensor, b: torch.Tensor, scheme: _Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(a) * b in a's dtype, quantized per token for `scheme`: (q [M, N], scale [M]). One Triton
    kernel on CUDA (runtime/kernels.py); elsewhere these torch ops, which the kernel matches except
    for one quantization step on a few elements per million (rounding ties; tests/test_gpu.py)."""
    if kernels.fused_swiglu_available(a):
        return kernels.swiglu_quantize_cuda(a, b, scheme.weight_dtype, scheme.qmax, SCALE_FLOOR)
    return _quantize_rows(F.silu(a) * b, scheme)


# ---- the module and the swap ---------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A bias-free linear y = x W^T with W stored quantized; behaviour set by its scheme."""

    def __init__(self, in_features: int, out_features: int, scheme: _Scheme, *,
                 device: torch.device | str | None = None):
        super().__init__()
        scheme.check_shape(in_features, out_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("qdata", torch.empty(out_features, in_features, dtype=scheme.weight_dtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def empty_like(cls, linear: nn.Linear, scheme: _Scheme) -> "QuantLinear":
        """Uninitialised buffers of the right shapes and dtypes, on the linear's device (meta: no memory)."""
        _check_linear(linear)
        return cls(linear.in_features, linear.out_features, scheme, device=linear.weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: _Scheme) -> "QuantLinear":
        """Quantize `linear.weight` (already multiplied by any SmoothQuant factors)."""
        mod = cls.empty_like(linear, scheme)
        with torch.no_grad():
            mod.qdata, mod.scale = quantize_weight(linear.weight.detach(), scheme)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        out = _KERNELS[self.scheme.name](x2, self.qdata, self.scale, **self.scheme.product_options())  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward_swiglu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """self(silu(a) * b): w2 of a SwiGLU block, a = w1 x and b = w3 x. With activation
        quantization the product is quantized as it is made (swiglu_quantize), instead of being
        written out in the compute dtype and read back to be quantized."""
        if not self.scheme.quantizes_activations:
            return self(F.silu(a) * b)
        a2, b2 = a.reshape(-1, self.in_features), b.reshape(-1, self.in_features)
        q, a_scale = swiglu_quantize(a2, b2, self.scheme)
        out = _PRODUCTS[self.scheme.name](q, a_scale, self.qdata, self.scale, a.dtype,
                                          **self.scheme.product_options())
        return out.reshape(*a.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.describe()}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # With assign=True torch takes the stored tensor as it is, dtype included: a qdata cast to
        # bf16 on the way would load silently and compute garbage. Refuse it here.
        for name in ("qdata", "scale"):
            want, got = getattr(self, name), state_dict.get(prefix + name)
            if got is not None and got.dtype != want.dtype:
                error_msgs.append(f"{prefix}{name}: stored as {got.dtype}, {self.scheme.name!r} needs {want.dtype} "
                                  "(quantized tensors must not be cast to the compute dtype)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


BLOCK_LINEARS = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "w3"})


def block_linears(name: str, module: nn.Module) -> bool:
    """Default filter: the seven linears of a transformer block; never the embeddings or `output`."""
    return name.rsplit(".", 1)[-1] in BLOCK_LINEARS


def swap_linears(model: nn.Module, scheme: _Scheme,
                 filter: Callable[[str, nn.Module], bool] = block_linears, _prefix: str = "") -> nn.Module:
    """Replace, in place and recursively, every nn.Linear for which filter(full_name, module) holds.

    A linear on the meta device becomes an EMPTY QuantLinear (shapes and dtypes only, for
    load_state_dict(strict=True, assign=True)); any other is quantized with from_float. Returns the model."""
    for name, child in model.named_children():
        full = f"{_prefix}{name}"
        if isinstance(child, nn.Linear) and filter(full, child):
            new = QuantLinear.empty_like(child, scheme) if child.weight.is_meta else QuantLinear.from_float(child, scheme)
            setattr(model, name, new)
        else:
            swap_linears(child, scheme, filter, _prefix=f"{full}.")
    return model


def _check_linear(linear: nn.Module) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    if linear.bias is not None:
        raise ValueError("QuantLinear has no bias (LLaMA's linears have none)")
