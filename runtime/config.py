"""Configuration dataclasses: the model (mirrors Meta's params.json) and the artifact manifest.

The manifest is the contract between `toolchain/` (which writes it) and `runtime/` (which reads it):
everything the runtime needs is here, nothing is encoded in file names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import HscError, file_error

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Precision names as they appear in manifests and on the command line, with the torch dtype name
# the weights are stored in.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Quantized precisions (runtime/quant.py schemes): the block linears are stored quantized, everything
# else (embeddings, norms, LM head) in the manifest's `compute_dtype`.
QUANTIZED_PRECISIONS = ("fp8", "int8", "w8")


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
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise file_error(path, "missing (a Meta checkpoint needs params.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise file_error(path, f"not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise file_error(path, "expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.update(overrides)
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in kwargs]
        if missing:
            raise file_error(path, f"missing required field(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise file_error(path, str(e)) from None

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
        for name in ("dim", "n_layers", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")

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
    def from_json(cls, text: str, path: Path) -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise file_error(path, f"not valid JSON ({e})") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise file_error(
                path,
                f"unknown manifest format_version {version!r}; this hsc reads version {FORMAT_VERSION}"
                " (recompile the artifact with this hsc)",
            )
        try:
            return cls(
                format_version=version,
                model_name=raw["model_name"],
                model=ModelArgs(**raw["model"]),
                target=raw["target"],
                precision=raw["precision"],
                mapping=Mapping(**raw["mapping"]),
                plan=raw["plan"],
                shards=tuple(ShardFile(**s) for s in raw["shards"]),
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                provenance=Provenance(**raw["provenance"]),
                target_info=_target_info(raw.get("target_info")),
                compute_dtype=raw.get("compute_dtype"),
                quantization=_optional_object("quantization", raw.get("quantization")),
                calibration=_optional_object("calibration", raw.get("calibration")),
                smoothing=_optional_object("smoothing", raw.get("smoothing")),
                quant_report=_optional_object("quant_report", raw.get("quant_report")),
                resources=_optional_object("resources", raw.get("resources")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise file_error(path, f"malformed manifest ({type(e).__name__}: {e})") from None


def _target_info(raw) -> dict | None:
    if raw is not None and not isinstance(raw, dict):
        raise TypeError(f"target_info must be an object, got {type(raw).__name__}")
    return raw


def _optional_object(name: str, raw) -> dict | None:
    if raw is not None and not isinstance(raw, dict):
        raise TypeError(f"{name} must be an object, got {type(raw).__name__}")
    return raw


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


def require(cond: bool, path, problem: str) -> None:
    if not cond:
        raise file_error(path, problem)


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
