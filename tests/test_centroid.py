"""Tests for centroid.py: answer embeddings, FPL pseudo labels, cosines and the majority-vote baseline."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from centroid import (  # noqa: E402
    answer_embeddings, centroid_cosines, cosine_to_pseudo_label, fpl_pseudo_labels, majority_vote,
)


def test_answer_embeddings_masked_mean_and_empty_row():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                           [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])  # [2, 3, 2]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    emb = answer_embeddings(hidden, mask)
    assert emb.tolist() == [[2.0, 4.0], [0.0, 0.0]]  # padding ignored; empty answer -> zero, not nan
    emb_bf16 = answer_embeddings(hidden.bfloat16(), mask.bool())
    assert emb_bf16.dtype == torch.float32
    assert emb_bf16.tolist() == [[2.0, 4.0], [0.0, 0.0]]


def majority_cluster_group():
    """8 answers: 5 near direction e0 (index 3 exactly on it), 3 large outliers on e1, e2, e3."""
    d = 16
    eye = torch.eye(d)
    rows = [50 * eye[1],                 # outlier, huge norm
            eye[0] + 0.1 * eye[4],
            eye[0] + 0.1 * eye[5],
            eye[0],                      # the answer nearest the centroid
            eye[0] + 0.1 * eye[6],
            60 * eye[2],                 # outlier
            eye[0] + 0.1 * eye[7],
            70 * eye[3]]                 # outlier
    return torch.stack(rows)


def test_fpl_picks_answer_nearest_centroid_of_majority_cluster():
    # Without L2 normalisation the huge outliers would dominate the mean and win.
    group = majority_cluster_group()
    identical = torch.ones(8, 16)  # all tied -> lowest index
    emb = torch.cat([group, identical])
    labels = fpl_pseudo_labels(emb, 8)
    assert labels.dtype == torch.long
    assert labels.tolist() == [3, 0]


def test_fpl_matches_numpy_reference_on_random_embeddings():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5))  # 3 groups of 4
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    expected_cos, expected_labels = [], []
    for g in range(3):
        block = unit[4 * g:4 * g + 4]
        centroid = block.mean(axis=0)
        cos = block @ centroid / np.linalg.norm(centroid)
        expected_cos.extend(cos)
        expected_labels.append(int(np.argmax(cos)))
    emb_t = torch.tensor(emb, dtype=torch.float64)
    assert centroid_cosines(emb_t, 4).numpy() == pytest.approx(np.array(expected_cos), abs=1e-5)
    assert fpl_pseudo_labels(emb_t, 4).tolist() == expected_labels
    assert fpl_pseudo_labels(emb_t.bfloat16(), 4).dtype == torch.long


def test_cosine_to_pseudo_label_hand_example():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0],
                        [0.0, 0.0], [0.0, 3.0], [0.0, -2.0]])
    cos = cosine_to_pseudo_label(emb, 3, torch.tensor([0, 1]))
    assert cos.dtype == torch.float32
    assert cos.tolist() == pytest.approx([1.0, 0.0, 2 ** -0.5, 0.0, 1.0, -1.0])  # zero vector -> 0, no nan


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size=3"):
        fpl_pseudo_labels(torch.ones(4, 2), 3)
    with pytest.raises(ValueError, match="group_size=3"):
        majority_vote(["a"] * 4, 3)


def test_majority_vote_normalises_and_takes_first_most_frequent():
    texts = ["The left lung.", "right lung", "left lung", "Right lung!",  # 2-2 tie -> first: index 0
             "liver", "heart", "Heart.", "spleen",                       # heart x2 -> index 1
             "x", "y", "z", "w"]                                        # all distinct -> index 0
    assert majority_vote(texts, 4) == [0, 1, 0]
