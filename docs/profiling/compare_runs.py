"""Compare two hsc runs' samples.jsonl item by item (e.g. TP=4 or DP=4 against TP=1, fp8 against bf16).

    python docs/profiling/compare_runs.py REFERENCE/samples.jsonl OTHER/samples.jsonl [more ...]

Prints, for each OTHER: acc_norm of both, the largest and mean |Δ loglik| per ending, pred and
pred_norm agreement, and McNemar's exact p on acc_norm correctness (toolchain/quant_check.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from toolchain.quant_check import mcnemar_exact  # noqa: E402


def load(path):
    return [json.loads(line) for line in open(path)]


def compare(ref, other) -> str:
    a, b = load(ref), load(other)
    if [x["index"] for x in a] != [x["index"] for x in b]:
        return f"{other}: different items than {ref}"
    n = len(a)
    d = [abs(u - v) for x, y in zip(a, b) for u, v in zip(x["loglik"], y["loglik"])]
    ok_a = [x["pred_norm"] == x["label"] for x in a]
    ok_b = [y["pred_norm"] == y["label"] for y in b]
    lost = sum(p and not q for p, q in zip(ok_a, ok_b))
    won = sum(q and not p for p, q in zip(ok_a, ok_b))
    return (f"{other}: n={n} acc_norm {100 * sum(ok_a) / n:.2f} -> {100 * sum(ok_b) / n:.2f}; "
            f"|d loglik| max {max(d):.3g} mean {sum(d) / len(d):.3g}; "
            f"pred agree {100 * sum(x['pred'] == y['pred'] for x, y in zip(a, b)) / n:.2f}%, "
            f"pred_norm agree {100 * sum(x['pred_norm'] == y['pred_norm'] for x, y in zip(a, b)) / n:.2f}%; "
            f"McNemar {lost} lost / {won} won, p {mcnemar_exact(lost, won):.3g}")


if __name__ == "__main__":
    for other in sys.argv[2:]:
        print(compare(sys.argv[1], other))
