"""What `hsc run` leaves in its output directory, and how it gets there.

A finished run's directory holds one set of files:
- results.json: scores, settings, environment, timings, and `files`: the sha256 of every other file of
  the set. It is written last, so its presence marks a finished run and names exactly the set it ends.
- samples.jsonl: one line per item (log-likelihoods, predictions), in item order.
- lm-eval/results_<date>.json and lm-eval/samples_hellaswag_<date>.jsonl: the same numbers in the shapes
  lm-evaluation-harness writes (EvaluationTracker), for the tools that read those.
While a run scores, the directory also holds its lock (.lock) and its journal (journal/, runtime/journal.py),
which the finished set replaces.

Rules: a run never replaces an earlier run's results silently (refused unless --overwrite), a second run
into a directory another run holds is refused (an flock the kernel drops when the holder dies, even by
kill -9), and the set is written into a temporary directory first, so a failure while writing (a full
disk) leaves nothing half-written: the earlier state, and one line saying what failed.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import file_error

RESULTS = "results.json"
SAMPLES = "samples.jsonl"
LM_EVAL_DIR = "lm-eval"
LOCK = ".lock"
PARTIAL_PREFIX = ".partial-"


def finite(x):
    """JSON has no NaN or infinity: an undefined number (a standard error of one item) is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def dumps(obj, **kwargs) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------- the directory: checks and lock


@dataclass
class OutputDir:
    """An output directory this process holds (its lock) for one run."""

    path: Path
    created: bool  # this run made the directory (removed again if it fails before scoring anything)
    lock_fd: int | None = None

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # drops the flock
            self.lock_fd = None

    def abandon(self) -> None:
        """A run that failed before it journalled anything leaves no directory it made behind."""
        if self.created and self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)  # still locked meanwhile: no one else claims it
        self.release()


def default_output(artifact) -> Path:
    return Path("results") / Path(artifact).resolve().name


def claim(out: Path, journal_dir: str, resume: bool, overwrite: bool) -> OutputDir:
    """Check what `out` holds against --resume/--overwrite and take its lock, or refuse with one line."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise file_error(out, f"cannot be used as the output directory ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise file_error(out, f"another hsc run (pid {holder}) is writing here; wait for it to end or pass "
                              "another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    held = OutputDir(out, created, fd)
    finished, journal = (out / RESULTS).exists(), (out / journal_dir).exists()
    problem = None
    if finished and not overwrite:
        problem = ("holds the results of an earlier run (results.json); pass --output DIR to write elsewhere, "
                   "or --overwrite to replace them")
    elif journal and not (resume or overwrite):
        problem = ("holds the journal of an unfinished run; pass --resume to continue it, or --overwrite to "
                   "start again")
    if problem:
        held.abandon()
        raise file_error(out, problem)
    if overwrite:
        shutil.rmtree(out / journal_dir, ignore_errors=True)
    return held


# ---------------------------------------------------------------- writing the set


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_set(out: Path, files: dict[str, str], results: dict) -> None:
    """Write `files` (relative name -> text) and then results.json (which lists their sha256) as one
    set: everything goes into out/.partial-PID/ first, is fsync'd, then renamed into place, results.json
    last. An earlier set in `out` is removed first (the caller checked that it may be: --overwrite)."""
    partial = out / f"{PARTIAL_PREFIX}{os.getpid()}"
    digests = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}
    results = {**results, "files": digests}
    try:
        shutil.rmtree(partial, ignore_errors=True)
        for name, text in {**files, RESULTS: dumps(results, indent=2) + "\n"}.items():
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        _remove_earlier_set(out)
        for name in [*files, RESULTS]:  # results.json last: it marks the set complete
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / name, out / name)
        _fsync_dir(out)
    except OSError as e:
        raise file_error(out, f"cannot write the results ({e.strerror or e}); nothing was written, and the "
                              "journal is kept: rerun with --resume once that is fixed") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_earlier_set(out: Path) -> None:
    """results.json first, so a set is never left looking finished with someone else's files."""
    earlier = out / RESULTS
    if not earlier.exists():
        return
    try:
        names = list(json.loads(earlier.read_text()).get("files", {}))
    except (ValueError, OSError, AttributeError):
        names = []
    earlier.unlink()
    for name in [SAMPLES, *names]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / LM_EVAL_DIR, ignore_errors=True)


# ---------------------------------------------------------------- hsc's own files


def samples_lines(items, requests, logliks, greedy, preds, preds_norm) -> str:
    """samples.jsonl: one line per item, in item order (greedy: per ending, whether every token is the
    model's most likely one)."""
    lines = []
    for k, item in enumerate(items):
        reqs = requests[4 * k: 4 * k + 4]
        lines.append(dumps({
            "index": item.index, "label": item.label, "loglik": logliks[4 * k: 4 * k + 4],
            "cont_chars": [len(e) for e in item.endings], "cont_tokens": [len(r.continuation) for r in reqs],
            "greedy": greedy[4 * k: 4 * k + 4], "pred": preds[k], "pred_norm": preds_norm[k]}))
    return "\n".join(lines) + "\n"


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def hsc_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hsc")
    except PackageNotFoundError:
        return None


def data_sha256(source: str) -> str | None:
    """sha256 of the data file (None for `datasets`, whose items the journal key hashes instead)."""
    path = Path(source)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def environment(data_source: str) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "hsc_version": hsc_version(),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": platform.node(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_sha256": data_sha256(data_source),
    }


# ---------------------------------------------------------------- lm-evaluation-harness's shapes


def hash_string(text: str) -> str:
    """lm-eval's utils.hash_string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lm_eval_samples(items, logliks, greedy, preds, preds_norm) -> str:
    """samples_hellaswag_<date>.jsonl as lm-eval's EvaluationTracker.save_results_samples writes it: one
    line per doc; `arguments` as {gen_args_i: {arg_0: context, arg_1: continuation}}; `resps` and
    `filtered_resps` through its sanitize_list, i.e. as strings: [[["loglik", "is_greedy"]], ...] and
    [["loglik", "is_greedy"], ...]. `doc` is the processed doc (query, choices, gold) hsc reads, so
    doc_hash hashes that, not the raw dataset row lm-eval also keeps."""
    lines = []
    for k, item in enumerate(items):
        doc = {"query": item.query, "choices": list(item.endings), "gold": item.label}
        pairs = [(str(float(logliks[4 * k + j])), str(greedy[4 * k + j])) for j in range(4)]
        lines.append(dumps({
            "doc_id": k,
            "doc": doc,
            "target": str(item.label),
            "arguments": {f"gen_args_{j}": {"arg_0": item.query, "arg_1": " " + e}
                          for j, e in enumerate(item.endings)},
            "resps": [[list(p)] for p in pairs],
            "filtered_resps": [list(p) for p in pairs],
            "filter": "none",
            "metrics": ["acc", "acc_norm"],
            "doc_hash": hash_string(json.dumps(doc, indent=2, ensure_ascii=False)),
            "prompt_hash": hash_string(item.query),
            "target_hash": hash_string(str(item.label)),
            "acc": float(preds[k] == item.label),
            "acc_norm": float(preds_norm[k] == item.label),
        }, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def lm_eval_results(results: dict, n_original: int) -> dict:
    """results_<date>.json as lm-eval's simple_evaluate + EvaluationTracker write it, for one task."""
    env = results.get("environment", {})
    return {
        "results": {"hellaswag": {
            "alias": "hellaswag",
            "acc,none": results["acc"], "acc_stderr,none": results["acc_stderr"],
            "acc_norm,none": results["acc_norm"], "acc_norm_stderr,none": results["acc_norm_stderr"],
        }},
        "group_subtasks": {"hellaswag": []},
        "configs": {"hellaswag": {
            "task": "hellaswag", "dataset_path": "Rowan/hellaswag", "test_split": "validation",
            "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
            "target_delimiter": " ", "num_fewshot": 0, "output_type": "multiple_choice",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        }},
        "versions": {"hellaswag": 1.0},
        "n-shot": {"hellaswag": 0},
        "higher_is_better": {"hellaswag": {"acc": True, "acc_norm": True}},
        "n-samples": {"hellaswag": {"original": n_original, "effective": results["n"]}},
        "config": {
            "model": "hsc", "model_args": f"artifact={results['artifact']}", "model_name": results["model"],
            "batch_size": results.get("batch_tokens"), "device": results["device"], "limit": results["limit"],
            "bootstrap_iters": 0, "precision": results["precision"],
        },
        "git_hash": (env.get("git_commit") or "")[:7] or None,
        "date": results.get("start_time"),
        "torch_version": env.get("torch"),
        "model_name": results["model"],
        "model_name_sanitized": sanitize_model_name(results["model"]),
        "total_evaluation_time_seconds": str(results["timings"]["total_s"]),
    }


def sanitize_model_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "__" for c in str(name))


def lm_eval_names(date_id: str) -> tuple[str, str]:
    return f"{LM_EVAL_DIR}/results_{date_id}.json", f"{LM_EVAL_DIR}/samples_hellaswag_{date_id}.jsonl"


def date_id(now: datetime.datetime) -> str:
    """lm-eval's file stamp: datetime.now().isoformat() with ':' replaced by '-'."""
    return now.isoformat().replace(":", "-")
