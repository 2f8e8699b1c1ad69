"""What a score is made of: open_strict (exact match after normalize_for_eval on OPEN questions) and
answer_words (words per prediction, all questions), beside open recall and closed accuracy, on answers
worked out by hand."""

import pytest

from evaluate import answer_words, before_after, format_table, open_recall, open_strict, score_predictions

RECORDS = [
    {"answer": "Left Lung", "answer_type": "OPEN"},
    {"answer": "Left Lung", "answer_type": "OPEN"},
    {"answer": "2", "answer_type": "OPEN"},
    {"answer": "Yes", "answer_type": "CLOSED"},
    {"answer": None, "answer_type": "OPEN"},  # unlabeled: no score, but its answer has a length
]
TERSE = ["The left lung.", "liver", "two", "Yes", "CT"]
VERBOSE = ["The lesion is located in the left lung of the patient.", "The liver is on the right side.",
           "There are two kidneys.", "Yes, there is a lesion.", "This is a CT scan of the chest."]


def test_a_long_sentence_gains_open_recall_but_not_strict_score():
    sentence = "The lesion is located in the left lung of the patient."
    assert open_recall(sentence, "Left Lung") == 1.0
    assert open_strict(sentence, "Left Lung") == 0.0
    assert open_strict("The left lung.", "Left Lung") == 1.0  # case, article and punctuation do not count
    assert open_strict("two", "2") == 1.0  # number words are digits, as for recall
    assert open_strict("left-lung", "left lung") == 0.0  # SQuAD drops the hyphen: "leftlung"


def test_answer_lengths_by_hand():
    assert [answer_words(p) for p in TERSE] == [3, 1, 1, 1, 1]
    assert [answer_words(p) for p in VERBOSE] == [11, 7, 4, 5, 8]
    assert answer_words("") == 0 and answer_words("  left \n lung ") == 2


def test_score_predictions_reports_strict_and_length():
    terse, verbose = score_predictions(RECORDS, TERSE), score_predictions(RECORDS, VERBOSE)
    # terse: recall 1, 0, 1 and strict 1, 0, 1 on the three OPEN; words (3+1+1+1+1) / 5 over all five records
    assert terse["open_recall"] == pytest.approx(2 / 3) and terse["open_strict"] == pytest.approx(2 / 3)
    assert terse["answer_words"] == pytest.approx(7 / 5)
    # verbose: recall 1, 0, 1 (the sentences hold the answers' words), strict 0, 0, 0; words 35 / 5
    assert verbose["open_recall"] == pytest.approx(2 / 3) and verbose["open_strict"] == 0.0
    assert verbose["answer_words"] == pytest.approx(35 / 5)
    assert terse["closed_acc"] == verbose["closed_acc"] == 1.0
    assert (verbose["n_open"], verbose["n_closed"], verbose["n_unlabeled"]) == (3, 1, 1)
    assert set(verbose) == {"open_recall", "closed_acc", "overall", "n_open", "n_closed", "n_unlabeled",
                            "open_strict", "answer_words"}  # every earlier name kept, two added
    only_closed = score_predictions([{"answer": "yes", "answer_type": "CLOSED"}], ["yes it is"])
    assert only_closed["open_strict"] is None and only_closed["answer_words"] == 3.0
    with pytest.raises(TypeError, match="prediction 4 is not a str"):
        score_predictions(RECORDS, TERSE[:4] + [None])  # an unlabeled record's prediction is read too


def test_table_and_before_after_show_them():
    terse, verbose = score_predictions(RECORDS, TERSE), score_predictions(RECORDS, VERBOSE)
    table = format_table(verbose).splitlines()
    assert f"{'open strict (%)':<22}{'0.00':>10}" in table and f"{'answer words':<22}{'7.00':>10}" in table
    assert f"{'open recall (%)':<22}{'66.67':>10}" in table
    line = before_after(terse, verbose)
    assert "open recall 66.67 -> 66.67" in line and "open strict 66.67 -> 0.00" in line
    assert "answer words 1.40 -> 7.00" in line
    old_row = {k: v for k, v in terse.items() if k not in ("open_strict", "answer_words")}  # an older run's row
    assert "open strict" not in before_after(old_row, verbose) and "overall" in before_after(old_row, verbose)
    assert f"{'answer words':<22}{'-':>10}" in format_table(old_row).splitlines()
