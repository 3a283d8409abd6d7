"""Reading an artifact: manifest, integrity checks, one rank's weights, the model and tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file

from runtime.config import MANIFEST_MAX_BYTES, MANIFEST_NAME, QUANTIZED_PRECISIONS, Manifest
from runtime.errors import file_error
from runtime.model import Transformer, rope_tables
from runtime.quant import scheme_from_dict, swap_linears
from runtime.tokenizer import Tokenizer
from runtime.validate import read_bounded


def load_manifest(artifact: Path) -> Manifest:
    artifact = Path(artifact)
    path = artifact / MANIFEST_NAME
    if not artifact.is_dir():
        raise file_error(artifact, "not an artifact directory (no such directory)")
    if not path.is_file():
        raise file_error(path, "missing: not an hsc artifact")
    manifest = Manifest.from_json(read_bounded(path, MANIFEST_MAX_BYTES, "a manifest"), path)
    _scheme(artifact, manifest)  # a quantized artifact's scheme is part of what the manifest must get right
    return manifest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_file(artifact: Path, file: str, sha256: str, nbytes: int | None = None) -> None:
    path = Path(artifact) / file
    if not path.is_file():
        raise file_error(path, "missing from the artifact")
    if nbytes is not None and path.stat().st_size != nbytes:
        raise file_error(path, f"has {path.stat().st_size} bytes, the manifest says {nbytes} (tampered or truncated)")
    if sha256_of(path) != sha256:
        raise file_error(path, "sha256 does not match the manifest (tampered or corrupt)")


def verify_artifact(artifact: Path, manifest: Manifest) -> list[str]:
    """Recompute every checksum; return the files checked."""
    checked = []
    for shard in manifest.shards:
        verify_file(artifact, shard.file, shard.sha256, shard.bytes)
        checked.append(shard.file)
    verify_file(artifact, manifest.tokenizer.file, manifest.tokenizer.sha256)
    checked.append(manifest.tokenizer.file)
    calib = manifest.calibration
    if calib and calib.get("file") and calib.get("sha256"):  # quantized artifacts: the abs-max statistics
        verify_file(artifact, calib["file"], calib["sha256"], calib.get("bytes"))
        checked.append(calib["file"])
    return checked


def manifest_sha256(artifact: Path) -> str:
    return sha256_of(Path(artifact) / MANIFEST_NAME)


def load_tokenizer(artifact: Path, manifest: Manifest) -> Tokenizer:
    t = manifest.tokenizer
    verify_file(artifact, t.file, t.sha256)
    return Tokenizer(t.kind, Path(artifact) / t.file, t.bos_id, t.eos_id)


def load_rank_weights(artifact: Path, manifest: Manifest, tp_rank: int, device: str | torch.device,
                      shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The rank's safetensors file, checked against its sha256 before it is trusted, and, given the
    model's `shapes`, its header against them before any tensor is read."""
    shard = next((s for s in manifest.shards if s.tp_rank == tp_rank), None)
    if shard is None:
        raise file_error(Path(artifact) / MANIFEST_NAME, f"lists no shard for tensor-parallel rank {tp_rank}")
    verify_file(artifact, shard.file, shard.sha256, shard.bytes)
    try:
        if shapes is not None:
            _check_header(Path(artifact) / shard.file, shapes)
        return load_file(Path(artifact) / shard.file, device=str(device))
    except (SafetensorError, OSError) as e:
        raise file_error(Path(artifact) / shard.file, f"unreadable safetensors ({e})") from None


def _check_header(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The file's tensor names and shapes are the model's (the header only: nothing is allocated)."""
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        for name in sorted(names | set(shapes)):
            if name not in shapes:
                raise file_error(path, f"holds {name}, which the model has not (the manifest's model is another)")
            if name not in names:
                raise file_error(path, f"lacks {name}")
            got = tuple(f.get_slice(name).get_shape())
            if got != shapes[name]:
                raise file_error(path, f"{name} has shape {list(got)}, the manifest's model needs {list(shapes[name])}")


# QuantLinear buffers: stored in the scheme's dtypes (fp8 qdata is a float dtype too), never cast.
QUANT_BUFFERS = (".qdata", ".scale", ".act_pre_scale")


def _scheme(artifact: Path, manifest: Manifest):
    """The manifest's quantization scheme, or None for a float artifact."""
    path = Path(artifact) / MANIFEST_NAME
    if manifest.quantization is None:
        if manifest.precision in QUANTIZED_PRECISIONS:
            raise file_error(path, f"precision {manifest.precision} but no quantization scheme (malformed manifest)")
        return None
    try:
        return scheme_from_dict(manifest.quantization)
    except ValueError as e:
        raise file_error(path, str(e)) from None


def build_model(artifact: Path, manifest: Manifest, device: str | torch.device, tp_rank: int = 0,
                tp_group=None, compute_dtype: torch.dtype | None = None) -> Transformer:
    """Empty modules on the meta device, then the rank's tensors assigned in place (strict).

    A quantized artifact (manifest.quantization) gets its block linears swapped to QuantLinear on the
    meta device first; only float tensors are cast to the compute dtype, never a QuantLinear's buffers."""
    scheme = _scheme(artifact, manifest)
    dtype = compute_dtype or getattr(torch, manifest.float_dtype)
    with torch.device("meta"):
        model = Transformer(manifest.model, tp=manifest.mapping.tp, tp_group=tp_group)
        if scheme is not None:
            try:
                swap_linears(model, scheme)
            except ValueError as e:  # a rank's slice does not suit the scheme's kernel
                raise file_error(Path(artifact) / MANIFEST_NAME, str(e)) from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = load_rank_weights(artifact, manifest, tp_rank, device, shapes)
    try:
        model.load_state_dict({k: v if k.endswith(QUANT_BUFFERS) else v.to(dtype) for k, v in weights.items()},
                              strict=True, assign=True)
    except RuntimeError as e:
        shard = manifest.shards[tp_rank].file
        raise file_error(Path(artifact) / shard, f"does not match the model ({str(e).splitlines()[0]})") from None
    # Non-persistent buffers (RoPE tables) are not in the state dict: rebuild them on the device.
    cos, sin = rope_tables(manifest.model.head_dim, manifest.model.max_seq_len, manifest.model.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.keep_fp32_head()
    return model.use_half_split_rope().eval()
