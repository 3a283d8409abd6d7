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
`<linear>.qdata` ([out, in], int8 or float8_e4m3fn), `<linear>.scale` ([out], fp32) and, only where
SmoothQuant factors could not be folded into the preceding op, `<linear>.act_pre_scale` ([in], fp32):
the input is multiplied by it before anything else (the toolchain stores 1/s there and folds s into
the weight's columns). Loading follows the rest of the runtime: empty modules on the meta device
(`swap_linears` on a meta model), then `load_state_dict(strict=True, assign=True)`.

The LM head and the embeddings stay in floating point: the default filter swaps only the seven
linears of each transformer block (wq wk wv wo w1 w2 w3).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Collection
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


class Granularity(enum.Enum):
    """Which elements share one scale."""

    PER_TENSOR = "per_tensor"  # one scale for the whole tensor
    PER_ROW = "per_row"  # one scale per row of a weight [out, in]: per output channel
    PER_CHANNEL = "per_row"  # alias of PER_ROW
    PER_TOKEN = "per_token"  # one scale per row of an activation [tokens, in], computed at run time


SCHEME_VERSION = 1  # bump when the meaning of the stored tensors changes


@dataclass(frozen=True)
class _Scheme:
    """Fields common to all schemes; subclasses fix the dtypes and the kernel (class variables)."""

    name: ClassVar[str]
    weight_dtype: ClassVar[torch.dtype]
    qmax: ClassVar[float]  # largest magnitude of the quantized type that is used
    dim_multiple: ClassVar[int]  # in/out features must be multiples of this (the GPU kernel's rule)
    quantizes_activations: ClassVar[bool]

    weight_granularity: Granularity = Granularity.PER_ROW
    version: int = SCHEME_VERSION

    def __post_init__(self):
        if self.version != SCHEME_VERSION:
            raise ValueError(f"unknown version {self.version!r} of quantization scheme {self.name!r}; "
                             f"this hsc reads version {SCHEME_VERSION} (recompile the artifact with this hsc)")
        if not isinstance(self.weight_granularity, Granularity):
            raise TypeError(f"weight_granularity must be a Granularity, got {self.weight_granularity!r}")
        if self.weight_granularity is not Granularity.PER_ROW:
            raise ValueError(f"{type(self).__name__} supports weight_granularity PER_ROW only, "
                             f"got {self.weight_granularity.name}")

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
class _ActivationScheme(_Scheme):
    activation_granularity: Granularity = Granularity.PER_TOKEN

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.activation_granularity, Granularity):
            raise TypeError(f"activation_granularity must be a Granularity, got {self.activation_granularity!r}")
        if self.activation_granularity is not Granularity.PER_TOKEN:
            raise ValueError(f"{type(self).__name__} supports activation_granularity PER_TOKEN only, "
                             f"got {self.activation_granularity.name}")


@dataclass(frozen=True)
class Float8WeightFloat8Activation(_ActivationScheme):
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
class Int8WeightInt8Activation(_ActivationScheme):
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
    out = {"name": scheme.name}
    for f in dataclasses.fields(scheme):
        v = getattr(scheme, f.name)
        out[f.name] = v.value if isinstance(v, Granularity) else v
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"quantization scheme {name!r} has unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for key, value in raw.items():
        if key.endswith("granularity"):
            try:
                value = Granularity(value)
            except ValueError:
                known = ", ".join(sorted({g.value for g in Granularity}))
                raise ValueError(f"unknown {key} {value!r} in quantization scheme {name!r}; known: {known}") from None
        kwargs[key] = value
    try:
        return cls(**kwargs)
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
    products are summed in fp64 instead (exact too, and 46x faster than the CPU's _int_mm, measured)."""
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
                 act_pre_scale: bool = False, device: torch.device | str | None = None):
        super().__init__()
        scheme.check_shape(in_features, out_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("qdata", torch.empty(out_features, in_features, dtype=scheme.weight_dtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_pre_scale", torch.ones(in_features, device=device) if act_pre_scale else None)

    @classmethod
    def empty_like(cls, linear: nn.Linear, scheme: _Scheme, *, act_pre_scale: bool = False) -> "QuantLinear":
        """Uninitialised buffers of the right shapes and dtypes, on the linear's device (meta: no memory)."""
        _check_linear(linear)
        return cls(linear.in_features, linear.out_features, scheme, act_pre_scale=act_pre_scale,
                   device=linear.weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: _Scheme,
                   act_pre_scale: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize `linear.weight` (already multiplied by any SmoothQuant factors); `act_pre_scale` [in],
        if given, multiplies the input at run time."""
        mod = cls.empty_like(linear, scheme, act_pre_scale=act_pre_scale is not None)
        with torch.no_grad():
            mod.qdata, mod.scale = quantize_weight(linear.weight.detach(), scheme)
            if act_pre_scale is not None:
                if act_pre_scale.shape != (linear.in_features,):
                    raise ValueError(f"act_pre_scale must have shape ({linear.in_features},), "
                                     f"got {tuple(act_pre_scale.shape)}")
                mod.act_pre_scale = act_pre_scale.detach().float().to(linear.weight.device)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.act_pre_scale is not None:
            x2 = (x2.float() * self.act_pre_scale).to(x.dtype)
        out = _KERNELS[self.scheme.name](x2, self.qdata, self.scale, **self.scheme.product_options())  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward_swiglu(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """self(silu(a) * b): w2 of a SwiGLU block, a = w1 x and b = w3 x. With activation
        quantization the product is quantized as it is made (swiglu_quantize), instead of being
        written out in the compute dtype and read back to be quantized."""
        if not self.scheme.quantizes_activations or self.act_pre_scale is not None:
            return self(F.silu(a) * b)
        a2, b2 = a.reshape(-1, self.in_features), b.reshape(-1, self.in_features)
        q, a_scale = swiglu_quantize(a2, b2, self.scheme)
        out = _PRODUCTS[self.scheme.name](q, a_scale, self.qdata, self.scale, a.dtype,
                                          **self.scheme.product_options())
        return out.reshape(*a.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.describe()}, act_pre_scale={self.act_pre_scale is not None}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # With assign=True torch takes the stored tensor as it is, dtype included: a qdata cast to
        # bf16 on the way would load silently and compute garbage. Refuse it here.
        for name in ("qdata", "scale", "act_pre_scale"):
            want, got = getattr(self, name), state_dict.get(prefix + name)
            if want is not None and got is not None and got.dtype != want.dtype:
                error_msgs.append(f"{prefix}{name}: stored as {got.dtype}, {self.scheme.name!r} needs {want.dtype} "
                                  "(quantized tensors must not be cast to the compute dtype)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


BLOCK_LINEARS = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "w3"})


def block_linears(name: str, module: nn.Module) -> bool:
    """Default filter: the seven linears of a transformer block; never the embeddings or `output`."""
    return name.rsplit(".", 1)[-1] in BLOCK_LINEARS


def swap_linears(model: nn.Module, scheme: _Scheme,
                 filter: Callable[[str, nn.Module], bool] = block_linears,
                 pre_scaled: Collection[str] = (), _prefix: str = "") -> nn.Module:
    """Replace, in place and recursively, every nn.Linear for which filter(full_name, module) holds.

    A linear on the meta device becomes an EMPTY QuantLinear (shapes and dtypes only, for
    load_state_dict(strict=True, assign=True)); any other is quantized with from_float. Linears named
    in `pre_scaled` get an act_pre_scale buffer (ones until loaded). Returns the model."""
    for name, child in model.named_children():
        full = f"{_prefix}{name}"
        if isinstance(child, nn.Linear) and filter(full, child):
            if child.weight.is_meta:
                new = QuantLinear.empty_like(child, scheme, act_pre_scale=full in pre_scaled)
            else:
                ones = torch.ones(child.in_features, device=child.weight.device) if full in pre_scaled else None
                new = QuantLinear.from_float(child, scheme, act_pre_scale=ones)
            setattr(model, name, new)
        else:
            swap_linears(child, scheme, filter, pre_scaled, _prefix=f"{full}.")
    return model


def _check_linear(linear: nn.Module) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    if linear.bias is not None:
        raise ValueError("QuantLinear has no bias (LLaMA's linears have none)")
