"""Tests for the medical-VQA metrics in evaluate.py on hand-worked examples."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate import (  # noqa: E402
    closed_correct, format_table, normalize_for_eval, open_recall, score_predictions,
)


def test_normalize_for_eval_number_words():
    assert normalize_for_eval("Two lesions.") == "2 lesions"
    assert normalize_for_eval("There are TWENTY") == "there are 20"
    assert normalize_for_eval("zero") == "0"
    assert normalize_for_eval("twentyone") == "twentyone"  # only whole words zero..twenty


@pytest.mark.parametrize("pred, gt, expected", [
    ("Yes, there is a lesion.", "yes", True),
    ("No.", "no", True),
    ("There is no lesion", "no", True),
    ("There is no lesion", "yes", False),
    ("The heart is not enlarged.", "no", True),
    ("Yes, there is no abnormality.", "yes", True),   # a leading yes/no decides
    ("The image shows a mass, yes, but no effusion.", "yes", False),  # both polarities inside -> wrong
    ("The image shows a mass.", "yes", False),        # neither -> wrong, not dropped
    ("The lungs look normal.", "no", False),         # "normal" contains "no" only as a substring
    ("yes", "Yes", True),
])
def test_closed_correct_yes_no(pred, gt, expected):
    assert closed_correct(pred, gt) is expected


def test_closed_correct_other_answers():
    assert closed_correct("The liver", "liver")
    assert closed_correct("The liver is bigger.", "Liver")  # whole-word containment
    assert not closed_correct("heart", "liver")
    assert not closed_correct("liverwort", "liver")
    assert closed_correct("Two.", "2")


def test_open_recall():
    assert open_recall("left lower lobe of the lung", "Left lung") == 1.0
    assert open_recall("right lung", "left lung") == 0.5
    assert open_recall("two nodules", "2") == 1.0
    assert open_recall("lung lung", "lung lung left") == 0.5  # distinct gt words {lung, left}
    assert open_recall("", "the") == 1.0  # gt empty after normalisation: empty prediction matches
    assert open_recall("liver", "the") == 0.0


def test_score_predictions_and_table():
    records = [
        {"answer": "left lung", "answer_type": "OPEN"},
        {"answer": "left lung", "answer_type": "OPEN"},
        {"answer": "yes", "answer_type": "CLOSED"},
        {"answer": "no", "answer_type": "CLOSED"},
        {"answer": None, "answer_type": "OPEN"},
        {"answer": 2, "answer_type": "open"},
    ]
    preds = ["Left lung.", "right lung", "Yes.", "maybe", "anything", "two"]
    scores = score_predictions(records, preds)
    # open: 1.0, 0.5, 1.0 -> 2.5 / 3; closed: 1, 0 (unparseable counts as wrong) -> 0.5
    assert scores["open_recall"] == pytest.approx(2.5 / 3)
    assert scores["closed_acc"] == pytest.approx(0.5)
    assert scores["overall"] == pytest.approx(3.5 / 5)
    assert (scores["n_open"], scores["n_closed"], scores["n_unlabeled"]) == (3, 2, 1)
    table = format_table(scores)
    assert "83.33" in table and "50.00" in table and "70.00" in table
    assert table.splitlines()[-3:] == [f"{'n_open':<22}{'3':>10}", f"{'n_closed':<22}{'2':>10}",
                                       f"{'n_unlabeled':<22}{'1':>10}"]


def test_score_predictions_bad_input():
    with pytest.raises(ValueError, match="2 records but 1"):
        score_predictions([{"answer": "a", "answer_type": "OPEN"}] * 2, ["a"])
    with pytest.raises(ValueError, match="'MCQ'"):
        score_predictions([{"answer": "a", "answer_type": "MCQ"}], ["a"])
    only_closed = score_predictions([{"answer": "yes", "answer_type": "CLOSED"}], ["no"])
    assert only_closed["open_recall"] is None and only_closed["closed_acc"] == 0.0
    assert "-" in format_table(only_closed).splitlines()[2]
