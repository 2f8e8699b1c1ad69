"""Tests for reward.py: SQuAD-style text metrics and the Hard-Soft Reward, on hand-worked examples."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward import exact_match, exact_rewards, f1_rewards, hsr, hsr_rewards, normalize_answer, token_f1  # noqa: E402
import centroid  # noqa: E402


def test_normalize_answer_squad_convention():
    assert normalize_answer("  The  LEFT lung. ") == "left lung"
    assert normalize_answer("An X-ray of a chest!") == "xray of chest"  # punctuation dropped, not spaced
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert normalize_answer("The.") == ""


def test_exact_match():
    assert exact_match("The left lung.", "left lung") == 1.0
    assert exact_match("left lung", "right lung") == 0.0
    assert exact_match("lung left", "left lung") == 0.0


def test_token_f1_worked_examples():
    # pred words [left, upper, lobe], ref [left, lobe]: 2 common, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the left upper lobe", "left lobe") == pytest.approx(0.8)
    # multiset overlap: pred [lung, lung], ref [lung]: 1 common, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("lung lung", "lung") == pytest.approx(2 / 3)
    # [left, lung] vs [right, lung]: P = R = 1/2
    assert token_f1("left lung", "right lung") == pytest.approx(0.5)
    assert token_f1("liver", "heart") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("the", "liver") == 0.0  # one empty


def test_hsr_tiers_worked_example():
    assert hsr("The left lung.", "left lung", cos=-1.0) == 1.0  # hard tier ignores cos
    # F1 = 0.8, cos = 0.6: 0.5 * (0.5 * 0.8 + 0.5 * 0.6) = 0.35
    assert hsr("left upper lobe", "left lobe", cos=0.6) == pytest.approx(0.35)
    # negative cosine gives no credit: 0.5 * (0.5 * 0.8 + 0) = 0.2
    assert hsr("left upper lobe", "left lobe", cos=-0.3) == pytest.approx(0.2)
    # other weights: 0.9 * (0.25 * 0.8 + 0.75 * 0.6) = 0.585
    assert hsr("left upper lobe", "left lobe", cos=0.6, soft_weight=0.9, f1_weight=0.25) == pytest.approx(0.585)


def test_hsr_rejects_soft_weight_that_could_tie_exact_match():
    with pytest.raises(ValueError, match="soft_weight"):
        hsr("a", "b", cos=0.0, soft_weight=1.0)
    with pytest.raises(ValueError, match="f1_weight"):
        hsr("a", "b", cos=0.0, f1_weight=1.5)


def test_hsr_exact_match_beats_every_soft_score():
    rng = random.Random(0)
    vocab = ["left", "right", "lung", "liver", "the", "yes", "no", "lobe", "Left", "lung."]
    for _ in range(500):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4)))
        cos = rng.uniform(-1.5, 1.5)  # even out-of-range cosines (round-off) must not reach 1
        soft_weight, f1_weight = rng.uniform(0.0, 0.999), rng.uniform(0.0, 1.0)
        score = hsr(pred, ref, cos, soft_weight, f1_weight)
        if normalize_answer(pred) == normalize_answer(ref):
            assert score == 1.0
        else:
            assert 0.0 <= score <= soft_weight < 1.0


# two groups of G = 3; pseudo labels: group 0 -> answer 0, group 1 -> answer 1
TEXTS = ["left lung", "The left lung.", "right lung", "yes", "no", "No."]
LABELS = torch.tensor([0, 1])
COS = torch.tensor([1.0, 0.9, 0.4, -0.2, 1.0, 0.95])


def test_batch_rewards_each_kind():
    targets = centroid.label_of_each_answer(["left lung", "no"], 3)  # each answer's group's pseudo label
    exact = exact_rewards(TEXTS, targets)
    assert exact.dtype == torch.float32
    assert exact.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert f1_rewards(TEXTS, targets).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0, 1.0, 1.0])
    # "right lung" vs "left lung": 0.5 * (0.5 * 0.5 + 0.5 * 0.4) = 0.225; "yes" vs "no": F1 0, cos < 0 -> 0
    assert hsr_rewards(TEXTS, targets, COS).tolist() == pytest.approx([1.0, 1.0, 0.225, 0.0, 1.0, 1.0])


def test_batch_rewards_bad_input():
    targets = centroid.label_of_each_answer(["left lung", "no"], 3)
    with pytest.raises(ValueError, match="6 answers but 5 targets"):
        exact_rewards(TEXTS, targets[:5])
    with pytest.raises(ValueError, match="hsr_rewards: 6 answers but None"):
        hsr_rewards(TEXTS, targets, None)
    with pytest.raises(ValueError, match="soft_weight"):
        hsr_rewards(TEXTS, targets, COS, soft_weight=1.0)
