"""What the profiling scripts share: the real HellaSwag requests (LLaMA tokenizer, BOS on, as `hsc bench`)
and a CUDA-event timer."""

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
