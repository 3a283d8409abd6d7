"""What torch.compile produced for an artifact, kept so that the next run warms up without recompiling.

After a compiled run's warm-up, torch's portable cache (`torch.compiler.save_cache_artifacts()`: the
inductor FX-graph cache entries, AOTAutograd entries and the Triton autotuning results of this process)
is written to `compile-<key>.bin`; the next run with the same key loads it
(`torch.compiler.load_cache_artifacts`) before its warm-up, so inductor finds every graph it would
build already built and only tracing and CUDA-graph capture remain.

The key is the sha256 of everything that invalidates what was compiled: torch's version and CUDA
version, the device (GPU name and compute capability, or the CPU), the artifact (its manifest's sha256:
shapes, dtypes, quantization), the batch shape and layout, the process plan (TP: the all-reduces in the
graph) and hsc's version. Another key never loads the file.

Where: the per-user cache (runtime.artifact.user_cache_dir()/compile) is read and written. The file is
also written into the artifact's `cache/` directory when that is writable, so a copy of the artifact
brings it to a fresh machine with the same torch and GPU. Loading it runs code that torch generated, so
a file there is read only when it belongs to the user running hsc and no one else can write it (the
rule ssh applies to its keys): an artifact directory someone else can write does not get to run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import torch

from runtime.artifact import user_cache_dir

ARTIFACT_CACHE_DIR = "cache"


def cache_key(manifest_sha256: str, device: torch.device, settings: dict) -> str:
    """settings: what else decides the compiled graphs (layout, batch shape, TP...)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = {"gpu": props.name, "capability": [props.major, props.minor]}
    else:
        import platform

        where = {"cpu": platform.processor() or platform.machine()}
    doc = {"torch": torch.__version__, "cuda": torch.version.cuda, **where, "manifest": manifest_sha256,
           **settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _name(key: str) -> str:
    return f"compile-{key}.bin"


def _safe_to_load(path: Path) -> bool:
    """Owned by this user and writable by no one else (nor is its directory)."""
    try:
        for p in (path, path.parent):
            st = p.stat()
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return False
        return True
    except OSError:
        return False


def load(key: str, artifact: Path) -> str | None:
    """Load the cache for `key` into torch's local caches; where it came from, or None (none found)."""
    for where, path in (("user cache", user_cache_dir() / "compile" / _name(key)),
                        ("artifact", Path(artifact) / ARTIFACT_CACHE_DIR / _name(key))):
        if not path.is_file() or not _safe_to_load(path):
            continue
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception:  # a damaged or foreign file: compile from scratch (it is only a cache)
            continue
        return where
    return None


def save(key: str, artifact: Path) -> list[Path]:
    """Write this process's compile artifacts for `key`; the paths written."""
    try:
        got = torch.compiler.save_cache_artifacts()
    except Exception:  # nothing recorded, or a backend that cannot serialise: nothing to keep
        return []
    if not got or not got[0]:
        return []
    data = got[0]
    written = []
    for folder in (user_cache_dir() / "compile", Path(artifact) / ARTIFACT_CACHE_DIR):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700 if folder.name == "compile" else 0o755)
            tmp = folder / f".{_name(key)}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, folder / _name(key))
            written.append(folder / _name(key))
        except OSError:  # a read-only artifact: the user cache alone
            continue
    return written
