"""Configuration dataclasses: the model (mirrors Meta's params.json) and the artifact manifest.

The manifest is the contract between `toolchain/` (which writes it) and `runtime/` (which reads it):
everything the runtime needs is here, nothing is encoded in file names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import HscError, file_error
from runtime.validate import (FieldError, Fields, entries, int_in, number_in, object_of, optional, parse_json,
                              read_json)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Precision names as they appear in manifests and on the command line, with the torch dtype name
# the weights are stored in.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Quantized precisions (runtime/quant.py schemes): the block linears are stored quantized, everything
# else (embeddings, norms, LM head) in the manifest's `compute_dtype`.
QUANTIZED_PRECISIONS = ("fp8", "int8", "w8")


# The sizes hsc accepts, from any source (params.json, GGUF, a manifest), stated in docs/input-limits.md:
# several times the largest LLaMA-family models, small enough that nothing derived from them exhausts
# memory before the weights are checked. Floats are (lo, hi]: finite and above lo.
MODEL_LIMITS = {
    "dim": (1, 1 << 16),
    "n_layers": (1, 1024),
    "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "multiple_of": (1, 1 << 16),
    "ffn_dim_multiplier": (0.0, 64.0),
    "norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e12),
    "hidden_dim": (1, 1 << 20),
    "max_seq_len": (1, 1 << 20),
}
OPTIONAL_MODEL_FIELDS = ("n_kv_heads", "ffn_dim_multiplier", "hidden_dim")
FLOAT_MODEL_FIELDS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")
PARAMS_JSON_MAX_BYTES = 1 << 20
MANIFEST_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class ModelArgs:
    """LLaMA hyper-parameters, field for field as in Meta's params.json."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: no grouped-query attention (= n_heads)
    vocab_size: int = -1  # -1 in params.json: take it from the tokenizer
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Not in Meta's params.json: GGUF states the FFN width directly, and that wins over the rule.
    hidden_dim: int | None = None
    max_seq_len: int = 2048  # positions the model was trained for; only used to refuse longer inputs

    @classmethod
    def from_params_json(cls, path: Path, **overrides) -> "ModelArgs":
        if not Path(path).exists():
            raise file_error(path, "missing (a Meta checkpoint needs params.json)")
        raw = read_json(path, PARAMS_JSON_MAX_BYTES, "a params.json")
        if not isinstance(raw, dict):
            raise file_error(path, "expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.update(overrides)
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in kwargs]
        if missing:
            raise file_error(path, f"missing required field(s) {', '.join(missing)}")
        return cls.from_fields(kwargs, path)

    @classmethod
    def from_fields(cls, kwargs: dict, path, prefix: str = "") -> "ModelArgs":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name not in fields:
                raise file_error(path, f"{prefix}{str(name)[:64]}: unknown field")
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in kwargs:
                raise file_error(path, f"{prefix}{name}: missing")
        try:
            return cls(**kwargs)
        except FieldError as e:
            raise e.at(path, prefix) from None

    def params_json(self) -> dict:
        """params.json as Meta writes it: optional fields only when they are set (hidden_dim, not a
        Meta field, only when set: from_params_json reads it back)."""
        out = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads, "n_layers": self.n_layers,
               "norm_eps": self.norm_eps, "vocab_size": self.vocab_size}
        if self.n_kv_heads is not None:
            out["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            out["rope_theta"] = self.rope_theta
        if self.hidden_dim is not None:
            out["hidden_dim"] = self.hidden_dim
        return out

    def __post_init__(self):
        """Types, ranges (MODEL_LIMITS) and relations; a FieldError (a ValueError) names the field."""
        for name, (lo, hi) in MODEL_LIMITS.items():
            value = getattr(self, name)
            if name == "vocab_size" and value == -1:
                continue
            if value is not None or name not in OPTIONAL_MODEL_FIELDS:
                if name in FLOAT_MODEL_FIELDS:
                    number_in(value, name, lo, hi, lo_open=True)
                else:
                    int_in(value, name, lo, hi)
        if self.dim % self.n_heads:
            raise FieldError("n_heads", f"{self.n_heads} does not divide dim {self.dim}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise FieldError("dim", f"head dimension {self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if not 1 <= self.ffn_dim <= MODEL_LIMITS["hidden_dim"][1]:
            raise FieldError("hidden_dim", f"FFN width {self.ffn_dim} is outside 1..{MODEL_LIMITS['hidden_dim'][1]}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Meta's rule (llama/model.py FeedForward) unless the width was given explicitly."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def n_params(self) -> int:
        """Parameters including embeddings and an untied LM head."""
        assert self.vocab_size > 0, "vocab_size must be resolved first"
        d, kv = self.dim, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + 2 * d * kv + 3 * d * self.ffn_dim + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d


@dataclass(frozen=True)
class Mapping:
    """How the model is laid out on devices: tp ranks hold slices of every layer, dp replicas split items."""

    tp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    def __post_init__(self):
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"tp and dp must be >= 1, got tp={self.tp} dp={self.dp}")


@dataclass(frozen=True)
class ShardFile:
    """One safetensors file; `tp_rank` says which tensor-parallel slice it holds."""

    file: str
    tp_rank: int
    sha256: str
    bytes: int
    params_by_dtype: dict[str, int] = field(default_factory=dict)


TOKENIZER_KINDS = ("sentencepiece", "hf")


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    kind: str  # "sentencepiece" (tokenizer.model) or "hf" (tokenizer.json)
    sha256: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # the tokenizer's own convention; `hsc run --bos/--no-bos` overrides it


@dataclass(frozen=True)
class Provenance:
    source_path: str
    source_format: str  # "meta", "hf" or "gguf"
    source_sha256: str  # over the source files, in a fixed order
    toolchain_version: str
    command: str
    created_utc: str


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model_name: str
    model: ModelArgs
    target: str
    precision: str
    mapping: Mapping
    plan: str  # the planner's one-line explanation
    shards: tuple[ShardFile, ...]
    tokenizer: TokenizerInfo
    provenance: Provenance
    # The target machine as the runtime needs it to compare plan and machine (the runtime never
    # imports toolchain): gpu, compute_capability [major, minor], n_gpus, mem_per_gpu_gib.
    # Optional within format version 1: older manifests lack it (None).
    target_info: dict | None = None
    # Quantized artifacts only (precision fp8/int8/w8); all optional within format version 1, None for
    # float artifacts and for manifests written before they existed.
    compute_dtype: str | None = None  # torch dtype name of the float tensors and the compute: "bfloat16"...
    quantization: dict | None = None  # runtime.quant.scheme_asdict of the scheme
    # Where the calibration items came from: file, sha256 (of calibration.safetensors, the abs-max
    # statistics), source, split, item_ids, seed, n_items, n_tokens.
    calibration: dict | None = None
    # SmoothQuant: {"alpha": "auto" or the forced value, "per_layer": [alpha or None per layer]};
    # None when compiled with --no-smooth.
    smoothing: dict | None = None
    # Per quantized linear: output error vs the float (smoothed) linear on the calibration samples.
    quant_report: dict | None = None
    # What the compile cost (toolchain/resources.py): wall_s, peak_rss_bytes (VmHWM), peak_anon_bytes and
    # peak_file_bytes (sampled), hwm_since, sample_interval_s, peak_gpu_bytes. Optional: None in older manifests.
    resources: dict | None = None

    @property
    def float_dtype(self) -> str:
        """torch dtype name of the float tensors (all tensors, for a float artifact)."""
        return self.compute_dtype or PRECISION_DTYPES[self.precision]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, path: Path) -> "Manifest":
        """Every field checked for type, range and its relations to the others (one line naming the
        field when one is wrong); unknown top-level fields are ignored, unknown model fields are not."""
        raw = parse_json(text, path)
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if type(version) is not int or version != FORMAT_VERSION:
            raise file_error(
                path,
                f"unknown manifest format_version {version!r}; this hsc reads version {FORMAT_VERSION}"
                " (recompile the artifact with this hsc)",
            )
        f = Fields(raw, path)
        f.int("model.vocab_size", *MODEL_LIMITS["vocab_size"])  # -1 (from the tokenizer) is for params.json only
        model = ModelArgs.from_fields(f.obj("model").raw, path, "model.")
        precision = f.str("precision", choices=(*PRECISION_DTYPES, *QUANTIZED_PRECISIONS))
        mapping = _mapping(f.obj("mapping"), model)
        return cls(
            format_version=version,
            model_name=f.str("model_name", 1024),
            model=model,
            target=f.str("target", 256),
            precision=precision,
            mapping=mapping,
            plan=f.str("plan"),
            shards=_shards(f, mapping.tp),
            tokenizer=_tokenizer_info(f.obj("tokenizer"), model),
            provenance=Provenance(**{k: f.str(f"provenance.{k}") for k in PROVENANCE_FIELDS}),
            target_info=_target_info(f.obj("target_info", default=None, nullable=True)),
            compute_dtype=f.str("compute_dtype", choices=tuple(PRECISION_DTYPES.values()), default=None,
                                nullable=True),
            quantization=f.read(object_of, "quantization", default=None, nullable=True),
            calibration=_calibration(f.obj("calibration", default=None, nullable=True)),
            smoothing=_smoothing(f.obj("smoothing", default=None, nullable=True), model),
            quant_report=_quant_report(f.obj("quant_report", default=None, nullable=True)),
            resources=_resources(f.obj("resources", default=None, nullable=True)),
        )


# Bounds of the manifest's own numbers (docs/input-limits.md).
MAX_TP, MAX_DP = 1024, 1 << 16
MAX_FILE_BYTES = 1 << 50
SAFETENSORS_HEADER_MAX = 100 << 20  # what the safetensors library itself accepts
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1, "uint8": 1, "int32": 4,
               "int64": 8}
PROVENANCE_FIELDS = tuple(f.name for f in dataclasses.fields(Provenance))
MAX_ITEMS = 1 << 20  # item ids a calibration may list


def _mapping(f: Fields, model: ModelArgs) -> Mapping:
    tp, dp = f.int("tp", 1, MAX_TP), f.int("dp", 1, MAX_DP)
    for what, n in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads), ("FFN width", model.ffn_dim)):
        if n % tp:
            raise f.fail("tp", f"{tp} does not divide the model's {what} {n}")
    return Mapping(tp=tp, dp=dp)


def _shards(f: Fields, tp: int) -> tuple[ShardFile, ...]:
    """One shard per tensor-parallel rank, each with a size its tensors can fill."""
    shards = []
    for s in f.each("shards", MAX_TP, length=tp):
        params = s.obj("params_by_dtype")
        counts = {k: params.int(k, 0, MAX_FILE_BYTES) for k in params.raw}
        unknown = sorted(set(counts) - set(DTYPE_BYTES))
        if unknown:
            raise params.fail(unknown[0], f"unknown dtype (known: {', '.join(DTYPE_BYTES)})")
        nbytes = s.int("bytes", 8, MAX_FILE_BYTES)
        data = sum(n * DTYPE_BYTES[d] for d, n in counts.items())
        if not data + 8 <= nbytes <= data + 8 + SAFETENSORS_HEADER_MAX:
            raise s.fail("bytes", f"{nbytes} does not fit params_by_dtype ({data} bytes of tensor data)")
        shards.append(ShardFile(file=s.str("file", 4096), tp_rank=s.int("tp_rank", 0, tp - 1), sha256=s.sha256("sha256"),
                                bytes=nbytes, params_by_dtype=counts))
    ranks = [s.tp_rank for s in shards]
    if sorted(ranks) != list(range(tp)):
        raise f.fail("shards", f"tp ranks {ranks} are not 0..{tp - 1} once each")
    return tuple(shards)


def _tokenizer_info(f: Fields, model: ModelArgs) -> TokenizerInfo:
    ids = {k: f.int(k, 0, model.vocab_size - 1, nullable=True) for k in ("bos_id", "eos_id")}
    return TokenizerInfo(file=f.str("file", 4096), kind=f.str("kind", choices=TOKENIZER_KINDS),
                         sha256=f.sha256("sha256"), add_bos=f.bool("add_bos"), **ids)


def _target_info(f: Fields | None) -> dict | None:
    if f is None:
        return None
    f.str("gpu", 256, default=None, nullable=True)
    if f.list("compute_capability", 2, length=2, default=None, nullable=True) is not None:
        f.int("compute_capability.0", 0, 1000)
        f.int("compute_capability.1", 0, 1000)
    f.int("n_gpus", 0, MAX_TP * MAX_DP, default=None, nullable=True)
    f.number("mem_per_gpu_gib", -1, 1 << 30, default=None, nullable=True)
    return f.raw


def _calibration(f: Fields | None) -> dict | None:
    if f is None:
        return None
    for key in ("file", "source", "split", "reused_from"):
        f.str(key, 4096, default=None, nullable=True)
    f.sha256("sha256", default=None, nullable=True)
    for key in ("bytes", "seed", "n_items", "n_tokens"):
        f.int(key, 0, MAX_FILE_BYTES, default=None, nullable=True)
    f.read(entries, "item_ids", MAX_ITEMS, int_in, 0, MAX_FILE_BYTES, default=None, nullable=True)
    return f.raw


def _smoothing(f: Fields | None, model: ModelArgs) -> dict | None:
    if f is None:
        return None
    if f.get("alpha", None) != "auto":
        f.number("alpha", 0, 1, default=None, nullable=True)
    f.read(entries, "per_layer", model.n_layers, optional, number_in, 0, 1, default=None, nullable=True)
    return f.raw


# The numbers of a quantization check that `hsc inspect` prints (toolchain/quant_check.check_summary).
_CHECK_NUMBERS = ("agree_pred", "agree_pred_norm", "loglik_abs_diff.mean", "loglik_abs_diff.max", "float.acc_norm",
                  "quant.acc_norm", "acc_norm_drop_points", "mcnemar.p_two_sided")


def _quant_report(f: Fields | None) -> dict | None:
    if f is None:
        return None
    per_linear = f.obj("per_linear", default=None, nullable=True)
    for name in (per_linear.raw if per_linear else {}):
        if not re.fullmatch(r"layers\.\d{1,4}\.[\w.]{1,64}", name):
            raise per_linear.fail(name, "not a layers.N.NAME linear")
        r = per_linear.obj(name)
        r.number("sqnr_db", -1e6, 1e6, nullable=True)
        r.number("rel_error", 0, 1e30)
    check = f.obj("check", default=None, nullable=True)
    if check is not None and check.get("skipped", None) is None:
        check.int("items", 0, MAX_FILE_BYTES)
        check.number("max_drop", 0, 100, nullable=True)
        check.bool("passed", nullable=True)
        for key in _CHECK_NUMBERS:
            check.number(key, -1e30, 1e30)
        check.list("drop_ci95_points", 2, length=2)
        check.number("drop_ci95_points.0", -1e30, 1e30)
        check.number("drop_ci95_points.1", -1e30, 1e30)
        for layer in check.each("per_layer", MAX_TP * 1024, default=None, nullable=True):
            layer.number("sqnr_db", -1e6, 1e6, nullable=True)
    elif check is not None:
        check.str("skipped")
    return f.raw


def _resources(f: Fields | None) -> dict | None:
    if f is None:
        return None
    for key in ("wall_s", "peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes", "peak_gpu_bytes", "sample_interval_s"):
        f.number(key, 0, MAX_FILE_BYTES, default=None, nullable=True)
    f.str("hwm_since", 256, default=None, nullable=True)
    return f.raw


def weight_names(args: ModelArgs) -> list[str]:
    """Meta's tensor names, in the order the artifact stores them."""
    names = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        names += [f"layers.{i}.{n}" for n in LAYER_TENSORS]
    return names + ["norm.weight", "output.weight"]


# Per-layer tensors with Meta's names, relative to `layers.{i}.`.
LAYER_TENSORS = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


def layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes of one layer's tensors, as nn.Linear stores them: [out, in]."""
    d, kv, f = args.dim, args.kv_heads * args.head_dim, args.ffn_dim
    return {
        "attention_norm.weight": (d,),
        "attention.wq.weight": (d, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, d),
        "ffn_norm.weight": (d,),
        "feed_forward.w1.weight": (f, d),
        "feed_forward.w2.weight": (d, f),
        "feed_forward.w3.weight": (f, d),
    }


def global_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    return {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PRECISION_DTYPES",
    "QUANTIZED_PRECISIONS",
    "HscError",
    "ModelArgs",
    "Mapping",
    "ShardFile",
    "TokenizerInfo",
    "Provenance",
    "Manifest",
    "LAYER_TENSORS",
    "layer_shapes",
    "global_shapes",
    "weight_names",
]
