"""Reading an artifact: manifest, integrity checks, one rank's weights, the model and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from runtime.config import MANIFEST_MAX_BYTES, MANIFEST_NAME, QUANTIZED_PRECISIONS, Manifest
from runtime.errors import file_error
from runtime.model import Transformer, rope_tables
from runtime.paths import confined
from runtime.quant import scheme_from_dict, swap_linears
from runtime.tokenizer import Tokenizer
from runtime.validate import read_bounded


def load_manifest(artifact: Path) -> Manifest:
    artifact = Path(artifact)
    path = artifact / MANIFEST_NAME
    if not artifact.is_dir():
        raise file_error(artifact, "not an artifact directory (no such directory)")
    if not path.exists() and not path.is_symlink():
        raise file_error(path, "missing: not an hsc artifact")
    confined(artifact, MANIFEST_NAME, "artifact")
    manifest = Manifest.from_json(read_bounded(path, MANIFEST_MAX_BYTES, "a manifest"), path)
    for name, _, _ in artifact_files(manifest):  # every name the manifest gives stays inside the artifact
        confined(artifact, name, "artifact", must_exist=False)
    _scheme(artifact, manifest)  # a quantized artifact's scheme is part of what the manifest must get right
    return manifest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def user_cache_dir() -> Path:
    """hsc's per-user cache: $HSC_CACHE_DIR, else $XDG_CACHE_HOME/hsc, else ~/.cache/hsc."""
    if os.environ.get("HSC_CACHE_DIR"):
        return Path(os.environ["HSC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsc"


# The verification record: a file whose sha256 was checked is not hashed again while its identity is
# unchanged. Identity = (size, mtime_ns, ctime_ns, inode, device) of its real path:
# - size: truncation or appending; mtime: an ordinary edit (but anyone who can write the file can set
#   it back with os.utime);
# - ctime: set by the kernel to the current time on every change of content or metadata (a write, utime,
#   chmod, rename, a new hard link) and not settable by an unprivileged user, so an edit followed by a
#   restored mtime still changes it;
# - inode and device: the file replaced by another one (moved or copied over it).
# What it does not catch: a change that bypasses the file system's clock (root setting the system clock
# or editing the raw disk) and silent corruption of the stored bytes (bit rot), which changes no
# metadata: `hsc run --verify` (or `hsc inspect --verify`) hashes everything again.
# The records live in the per-user cache (0700), not in the artifact: whoever can write the artifact
# directory cannot forge them. A file changed within RACY_NS of being recorded could keep the ctime the
# record holds (the kernel's timestamps are coarse), so such a file is hashed again next time.
RACY_NS = 100_000_000


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _record_path(path: Path) -> Path:
    return user_cache_dir() / "verified" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")


def is_recorded(path: Path, sha256: str) -> bool:
    """The file was hashed to `sha256` before and its identity has not changed since."""
    try:
        record = _record_path(path)
        if record.stat().st_uid != os.getuid():
            return False
        doc = json.loads(record.read_text())
        return doc.get("sha256") == sha256 and doc.get("identity") == _identity(path.stat()) \
            and doc.get("path") == str(path.resolve())
    except (OSError, ValueError, AttributeError):
        return False


def _record(path: Path, before: os.stat_result, sha256: str) -> None:
    """Keep a record of a file just hashed, unless it changed meanwhile or too recently to tell."""
    try:
        st = path.stat()
        if _identity(st) != _identity(before) or time.time_ns() - st.st_ctime_ns < RACY_NS:
            return
        record = _record_path(path)
        record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "identity": _identity(st), "sha256": sha256}))
        os.replace(tmp, record)
    except OSError:  # no cache (a read-only home): the next run hashes again
        pass


def verify_file(artifact: Path, file: str, sha256: str, nbytes: int | None = None, force: bool = False) -> Path:
    """The path of `file`, confined to the artifact (runtime/paths.py), once its size and sha256 match
    (force: hashed even when its verification record vouches for it)."""
    return _check_file(artifact, file, sha256, nbytes, force)[0]


def _check_file(artifact: Path, file: str, sha256: str, nbytes: int | None, force: bool) -> tuple[Path, bool]:
    """verify_file's path, and whether the file was hashed (False: its verification record vouched for it)."""
    path = confined(artifact, file, "artifact")
    st = path.stat()
    if nbytes is not None and st.st_size != nbytes:
        raise file_error(path, f"has {st.st_size} bytes, the manifest says {nbytes} (tampered or truncated)")
    if not force and is_recorded(path, sha256):
        return path, False
    if sha256_of(path) != sha256:
        raise file_error(path, "sha256 does not match the manifest (tampered or corrupt)")
    _record(path, st, sha256)
    return path, True


def artifact_files(manifest: Manifest, tp_rank: int | None = None) -> list[tuple[str, str, int | None]]:
    """(file, sha256, bytes) of what the manifest lists: the rank files (only tp_rank's, if given), the
    tokenizer, and a quantized artifact's calibration statistics."""
    files = [(s.file, s.sha256, s.bytes) for s in manifest.shards if tp_rank is None or s.tp_rank == tp_rank]
    files.append((manifest.tokenizer.file, manifest.tokenizer.sha256, None))
    calib = manifest.calibration
    if calib and calib.get("file") and calib.get("sha256"):  # quantized artifacts: the abs-max statistics
        files.append((calib["file"], calib["sha256"], calib.get("bytes")))
    return files


def verify_artifact(artifact: Path, manifest: Manifest, tp_rank: int | None = None, force: bool = True) -> list[str]:
    """Check every file (force: recompute every checksum; else trust unchanged verified files); return
    the files hashed."""
    return [file for file, sha, nbytes in artifact_files(manifest, tp_rank)
            if _check_file(artifact, file, sha, nbytes, force)[1]]


def manifest_sha256(artifact: Path) -> str:
    return sha256_of(Path(artifact) / MANIFEST_NAME)


def load_tokenizer(artifact: Path, manifest: Manifest) -> Tokenizer:
    t = manifest.tokenizer
    return Tokenizer(t.kind, verify_file(artifact, t.file, t.sha256), t.bos_id, t.eos_id)


def load_rank_weights(artifact: Path, manifest: Manifest, tp_rank: int, device: str | torch.device,
                      verify: bool = True, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The rank's safetensors file, checked against its sha256 before it is trusted (verify=False: the
    caller checked it) and, given the model's `shapes`, its header against them before any tensor is read;
    read straight onto `device`."""
    shard = next((s for s in manifest.shards if s.tp_rank == tp_rank), None)
    if shard is None:
        raise file_error(Path(artifact) / MANIFEST_NAME, f"lists no shard for tensor-parallel rank {tp_rank}")
    if verify:
        path = verify_file(artifact, shard.file, shard.sha256, shard.bytes)
    else:
        path = confined(artifact, shard.file, "artifact")
    try:
        if shapes is not None:
            _check_header(path, shapes)
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise file_error(path, f"unreadable safetensors ({e})") from None


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
QUANT_BUFFERS = (".qdata", ".scale")


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
                tp_group=None, compute_dtype: torch.dtype | None = None, verify: bool = True) -> Transformer:
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
    weights = load_rank_weights(artifact, manifest, tp_rank, device, verify=verify, shapes=shapes)
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
