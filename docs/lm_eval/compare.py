"""Compare hsc's samples.jsonl with lm-evaluation-harness's logged samples, item by item.

    python docs/lm_eval/compare.py make-data SHARED_FILE N OUT.jsonl    # items 0..N-1 in lm-eval's form
    python docs/lm_eval/compare.py compare LM_EVAL_SAMPLES.jsonl HSC_SAMPLES.jsonl
"""

import bz2
import json
import sys


def make_data(src, n, out):
    lines = bz2.open(src, "rt", encoding="utf-8").read().split("\n")
    with open(out, "w", encoding="utf-8") as f:
        for i in range(int(n)):
            q, g, *e = lines[6 * i: 6 * i + 6]
            f.write(json.dumps({"query": q, "choices": e, "gold": int(g)}, ensure_ascii=False) + "\n")


def compare(lm_eval_samples, hsc_samples):
    rows = sorted((json.loads(x) for x in open(lm_eval_samples)), key=lambda r: r["doc_id"])
    ours = [json.loads(x) for x in open(hsc_samples)]
    assert [r["doc_id"] for r in rows] == [s["index"] for s in ours], "different items"
    n, same, same_norm, acc, acc_norm, worst = len(rows), 0, 0, 0.0, 0.0, 0.0
    for r, s in zip(rows, ours):
        ll = [float(x[0]) for x in r["filtered_resps"]]
        lens = [len(c) for c in r["doc"]["choices"]]
        pred = max(range(4), key=lambda j: (ll[j], -j))
        pred_norm = max(range(4), key=lambda j: (ll[j] / lens[j], -j))
        same += pred == s["pred"]
        same_norm += pred_norm == s["pred_norm"]
        acc += r["acc"]
        acc_norm += r["acc_norm"]
        worst = max(worst, max(abs(a - b) for a, b in zip(ll, s["loglik"])))
    print(f"n={n} lm-eval acc={acc / n:.4f} acc_norm={acc_norm / n:.4f}; "
          f"pred agreement {same / n:.2%}, pred_norm agreement {same_norm / n:.2%}; "
          f"max |loglik diff| {worst:.2e}")


if __name__ == "__main__":
    {"make-data": make_data, "compare": compare}[sys.argv[1]](*sys.argv[2:])
