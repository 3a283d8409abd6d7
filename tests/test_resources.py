"""toolchain/resources.py: the compile's wall time and peak memory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from toolchain.resources import ResourceMonitor, read_status, summary


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_monitor_catches_a_transient_allocation():
    with ResourceMonitor(interval=0.005) as monitor:
        before = read_status()["RssAnon"]
        x = torch.ones(50_000_000)  # 200 MB, written: resident and anonymous
        time.sleep(0.1)
        # the monitor's own thread must see it (snapshot() samples too): on a busy machine it may wait
        deadline = time.monotonic() + 60
        while monitor._peak.get("RssAnon", 0) < before + 190e6 and time.monotonic() < deadline:
            time.sleep(0.01)
        del x
        r = monitor.snapshot()
    assert read_status()["RssAnon"] < before + 100e6  # gone again
    assert r["peak_anon_bytes"] >= before + 190e6
    assert r["peak_rss_bytes"] >= r["peak_anon_bytes"] and r["peak_file_bytes"] > 0
    assert r["wall_s"] >= 0.1 and r["peak_gpu_bytes"] is None
    line = summary(r)
    assert "peak host memory" in line and "anonymous" in line and "GPU" not in line
