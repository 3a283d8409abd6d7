"""Wall time and peak memory of a compile: `hsc compile` logs them, the manifest keeps them (`resources`).

Host memory is reported three ways, because a compiler that memory-maps its checkpoint holds two
kinds of resident pages (Linux /proc/self/status):

- RssFile, file-backed: pages of memory-mapped files (the checkpoint shards) that the process has
  read. They are the page cache's copy of the disk, shared, and clean, so the kernel can take them
  back under pressure; but they stay in the process's RSS for as long as the mapping lives.
- RssAnon, anonymous: the process's own tensors, buffers and Python heap: what it really needs.
- VmHWM, the high-water mark of their sum (VmRSS), kept exactly by the kernel. It is reset at the
  start of the compile (writing 5 to /proc/self/clear_refs) where the kernel allows it; otherwise it
  is the peak since the process started (`hwm_since` says which). Where /proc/self/status has no
  VmHWM (a sandboxed kernel), getrusage's ru_maxrss stands in for it, also since the process started.

The kernel keeps no peak of RssAnon or RssFile alone: a thread samples them every `interval` seconds,
so a spike shorter than that may be missed (those two are lower bounds). On a GPU, the peak CUDA
memory allocated by torch is added. Elsewhere than on Linux the host fields are None.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
_FIELDS = {"VmHWM": "peak_rss_bytes", "RssAnon": "peak_anon_bytes", "RssFile": "peak_file_bytes"}


def read_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in bytes ({} where there is no /proc)."""
    out = {}
    try:
        text = STATUS.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


def _reset_hwm() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class ResourceMonitor:
    """Use as a context manager around the work; snapshot() any time (also while running)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        self._hwm_reset = False

    def __enter__(self) -> "ResourceMonitor":
        self._t0 = time.perf_counter()
        self._hwm_reset = _reset_hwm()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        self._sample()
        self._thread = threading.Thread(target=self._run, name="hsc-resources", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for key, value in read_status().items():
            if value > self._peak.get(key, -1):
                self._peak[key] = value

    def snapshot(self) -> dict:
        """Wall seconds since the start and the peaks so far (bytes), for the manifest."""
        self._sample()
        out = {"wall_s": round(time.perf_counter() - self._t0, 1)}
        for key, name in _FIELDS.items():
            out[name] = self._peak.get(key)
        out["hwm_since"] = "compile start" if self._hwm_reset else "process start"
        if out["peak_rss_bytes"] is None:  # no VmHWM: the kernel's own peak through getrusage (kB on Linux)
            out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["hwm_since"] = "process start (getrusage)"
        out["sample_interval_s"] = self.interval
        gpu = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        out["peak_gpu_bytes"] = gpu
        return out


def summary(r: dict) -> str:
    """One line for the compile log and `hsc inspect`."""
    gb = lambda v: "n/a" if v is None else f"{v / 1e9:.2f} GB"
    text = (f"wall {r.get('wall_s')} s; peak host memory {gb(r.get('peak_rss_bytes'))} "
            f"(VmHWM since {r.get('hwm_since', '?')}; sampled peaks: anonymous {gb(r.get('peak_anon_bytes'))}, "
            f"file-backed {gb(r.get('peak_file_bytes'))})")
    if r.get("peak_gpu_bytes") is not None:
        text += f"; peak GPU memory allocated {gb(r['peak_gpu_bytes'])}"
    return text
