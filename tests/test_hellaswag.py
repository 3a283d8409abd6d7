"""HellaSwag sources agree, bad lines are refused with the file and line, metrics match lm-eval's."""

import bz2
import json

import pytest

from runtime.errors import HscError
from runtime.hellaswag import VALIDATION_SIZE, load_items, load_six_line, load_split, preprocess
from runtime.scoring import compute_scores, mean_stderr, predictions, split_context

OFFICIAL = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
            "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
            "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}


def test_shared_file_has_the_validation_split(shared_data):
    items = load_six_line(shared_data)
    assert len(items) == VALIDATION_SIZE
    assert items[0].query == "Roof shingle removal: A man is sitting on a roof. he"
    assert items[0].label == 3 and items[0].endings[3] == "starts pulling up roofing on a roof."


def test_official_jsonl_matches_six_line(tmp_path):
    wikihow = dict(OFFICIAL, activity_label="Home and Garden", ctx_a="[header] How to dig. [title] Pick a spot.",
                   ctx_b="you", endings=["[step] Dig  a hole.", "b", "c", "d"], label=0)
    (tmp_path / "val.jsonl").write_text(json.dumps(OFFICIAL) + "\n" + json.dumps(wikihow) + "\n")
    items, _ = load_items(str(tmp_path / "val.jsonl"))
    # lm-eval capitalizes ctx_b; the shared 6-line file keeps the dataset's lower-case `ctx`.
    assert items[0].query == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].label == 3
    assert items[1].query == "Home and Garden: How to dig.. Pick a spot. You"
    # lm-eval strips before removing the markup, so the ending keeps a leading space; so do we.
    assert items[1].endings[0] == " Dig a hole."
    six = "\n".join([items[0].query, "3", *items[0].endings]) + "\n"
    (tmp_path / "val.txt.bz2").write_bytes(bz2.compress(six.encode()))
    assert load_items(str(tmp_path / "val.txt.bz2"))[0] == items[:1]


def test_the_split_of_a_source(tmp_path, monkeypatch):
    """The official jsonl's `split` field; else the file name; else the validation set's size."""
    def jsonl(name, *splits):
        path = tmp_path / name
        path.write_text("".join(json.dumps(dict(OFFICIAL, split=s)) + "\n" for s in splits))
        return str(path)

    assert load_split(jsonl("a.jsonl", "train", "train"))[2] == "train"
    assert load_split(jsonl("b.jsonl", "val"))[2] == "validation"
    assert load_split(jsonl("train.jsonl", "val"))[2] == "validation"  # the field wins over the name
    assert load_split(jsonl("c.jsonl", "train", "val"))[2] == "unknown"  # two splits in one file
    item = "ctx\n1\na\nb\nc\nd\n"
    for name, split in (("hellaswag_train.txt", "train"), ("my_val_slice.txt", "validation"), ("items.txt", "unknown"),
                        ("train_and_val.txt", "unknown"), ("hs_train64.txt", "train"), ("interval.txt", "unknown"),
                        ("Test.TXT", "test")):
        (tmp_path / name).write_text(item)
        items, source, got = load_split(str(tmp_path / name))
        assert (len(items), source, got) == (1, str((tmp_path / name).resolve()), split), name
    (tmp_path / "all.txt").write_text(item * VALIDATION_SIZE)  # no name hint: the validation set's size
    assert load_split(str(tmp_path / "all.txt"))[2] == "validation"

    import runtime.hellaswag as hs

    asked = []
    monkeypatch.setattr(hs, "load_datasets", lambda split="validation": asked.append(split) or [])
    assert load_split("datasets", datasets_split="train")[1:] == ("datasets:Rowan/hellaswag/train", "train")
    assert load_split("datasets")[1:] == ("datasets:Rowan/hellaswag/validation", "validation")
    assert asked == ["train", "validation"]


def test_preprocess_is_lm_evals():
    assert preprocess(" A [title] B [step] C  D ") == "A. B C D"


@pytest.mark.parametrize("body, problem", [
    ("ctx\n7\na\nb\nc\nd\n", "label 7 is not in 0-3"),
    ("ctx\nx\na\nb\nc\nd\n", "label 'x' is not an integer"),
    ("ctx\n1\na\nb\nc\n", "not a multiple of 6"),
])
def test_malformed_six_line(tmp_path, body, problem):
    f = tmp_path / "bad.txt"
    f.write_text(body)
    with pytest.raises(HscError) as e:
        load_items(str(f))
    assert str(f) in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_malformed_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(dict(OFFICIAL, endings=["a", "b", "c"])) + "\n")
    with pytest.raises(HscError, match=r"bad.jsonl:1: expected 4 endings, found 3"):
        load_items(str(f))
    f.write_text("{not json\n")
    with pytest.raises(HscError, match=r"bad.jsonl:1: not valid JSON"):
        load_items(str(f))


def test_split_context_moves_trailing_space():
    assert split_context("a b ", " c") == ("a b", "  c")
    assert split_context("a b", " c") == ("a b", " c")


def test_metrics_follow_lm_eval():
    class It:  # minimal item: endings of lengths 1, 10, 2, 3
        def __init__(self, label):
            self.endings, self.label = ("a", "b" * 10, "cc", "ddd"), label
    items = [It(1), It(0)]
    ll = [-1.0, -2.0, -3.0, -4.0, -5.0, -5.0, -9.0, -9.0]
    preds, preds_norm = predictions(items, ll)
    assert preds == [0, 0]  # highest sum; a tie goes to the first ending
    assert preds_norm == [1, 1]  # -2/10 beats -1/1; -5/10 beats -5/1
    s = compute_scores(items, preds, preds_norm)
    assert (s.acc, s.acc_norm, s.n) == (0.5, 0.5, 2)
    assert abs(mean_stderr([1.0, 0.0, 1.0, 1.0]) - 0.25) < 1e-12
