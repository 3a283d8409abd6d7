"""What the profiling scripts share: the real HellaSwag requests (LLaMA tokenizer, BOS on, as `hsc bench`),
a CUDA-event timer and a profiler kernel table."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from runtime.hellaswag import load_items  # noqa: E402
from runtime.scoring import build_requests  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402


def hellaswag_requests(n_items: int | None = None):
    """The validation set's requests (4 per item), the first n_items items or all."""
    items, _ = load_items(str(REPO / "shared/data/hellaswag_val_full.txt.bz2"))
    tok = Tokenizer("sentencepiece", REPO / "shared/data/llama-tokenizer.model", None, None)
    return build_requests(items[:n_items] if n_items else items, tok, add_bos=True)


def cuda_ms(fn, n: int = 20) -> float:
    """Median milliseconds of fn() over n timed calls, after 3 untimed ones."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def print_kernel_table(step, args, title: str, steps: int = 3, top: int = 24) -> None:
    """torch.profiler's CUDA kernels of `steps` calls of step(*args) (after 2 untimed ones), per call,
    longest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(*args)
        torch.cuda.synchronize()
    print(f"=== {title}: per step ({steps} steps)")
    ka = sorted(prof.key_averages(), key=lambda k: -k.device_time_total)
    tot = sum(k.device_time_total for k in ka)
    for k in ka[:top]:
        print(f"{k.device_time_total / steps / 1e3:8.3f} ms {k.count // steps:4d}x "
              f"{100 * k.device_time_total / tot:5.1f}%  {k.key[:120]}")
