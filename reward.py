"""Hard-Soft Reward (HSR): how well each sampled answer agrees with its group's pseudo label.

Med-Evo (arXiv 2603.07443) rewards each of the G answers sampled for a question
against the pseudo label picked by FPL (centroid.py). HSR has two tiers:

  hard tier: an answer that matches the pseudo label exactly (after SQuAD-style
             normalisation) gets reward 1.0;
  soft tier: any other answer gets partial credit from its lexical overlap
             (bag-of-words token F1) and its semantic closeness (cosine between the
             answer's embedding and the pseudo label's embedding), scaled by
             soft_weight < 1, so that no soft score can reach the hard tier.

The paper body was not available to us; the exact mixing is our reading of it:

  hsr = 1.0                                                     if exact match
      = soft_weight * (f1_weight * F1 + (1 - f1_weight) * clip(cos, 0, 1))  otherwise

with defaults soft_weight = 0.5 and f1_weight = 0.5 (soft scores lie in [0, 0.5]).
Negative cosines give no credit; the cosine is also capped at 1 so round-off can
never lift a soft score to soft_weight or beyond.

hsr_rewards() scores a batch of answers, each against its question's label; exact_rewards() (TTRL's reward)
and f1_rewards() are the ablations with one tier. The other rewards of the field (the oracles, RENT's entropy,
EVOL-RL's novelty) live in rules/, beside the tables that name them all.

The text metrics are written by hand (no external metric library) following the
SQuAD v1.1 evaluation script: lowercase, strip punctuation, drop a/an/the,
collapse whitespace; F1 over the multiset of words.
"""

import re
import string
from collections import Counter

import torch

DEFAULT_SOFT_WEIGHT = 0.5
DEFAULT_F1_WEIGHT = 0.5

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# -----------------------------------------------------------------------------
# text metrics (SQuAD convention)

def normalize_answer(s):
    """Lowercase, remove punctuation, remove articles, collapse whitespace (SQuAD)."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer: expected a str, got {type(s).__name__}: {s!r}")
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)  # "left-lung" -> "leftlung", as SQuAD
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred, ref):
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred, ref):
    """SQuAD bag-of-words F1 between normalised words (both empty -> 1.0, one empty -> 0.0)."""
    pred_words = normalize_answer(pred).split()
    ref_words = normalize_answer(ref).split()
    if not pred_words or not ref_words:
        return float(pred_words == ref_words)
    n_common = sum((Counter(pred_words) & Counter(ref_words)).values())
    if n_common == 0:
        return 0.0
    precision = n_common / len(pred_words)
    recall = n_common / len(ref_words)
    return 2 * precision * recall / (precision + recall)


# -----------------------------------------------------------------------------
# Hard-Soft Reward

def check_hsr_weights(soft_weight, f1_weight):
    if not 0.0 <= soft_weight < 1.0:
        raise ValueError(f"soft_weight must lie in [0, 1) so exact match always wins, got {soft_weight}")
    if not 0.0 <= f1_weight <= 1.0:
        raise ValueError(f"f1_weight must lie in [0, 1], got {f1_weight}")


def hsr(pred, ref, cos, soft_weight=DEFAULT_SOFT_WEIGHT, f1_weight=DEFAULT_F1_WEIGHT):
    """Hard-Soft Reward of answer `pred` against pseudo label `ref`.

    cos: cosine between the two answers' embeddings (centroid.cosine_to_pseudo_label).
    Returns 1.0 on exact match, else a soft score in [0, soft_weight].
    """
    check_hsr_weights(soft_weight, f1_weight)
    if exact_match(pred, ref) == 1.0:
        return 1.0
    cos = min(max(float(cos), 0.0), 1.0)
    return soft_weight * (f1_weight * token_f1(pred, ref) + (1.0 - f1_weight) * cos)


def hsr_rewards(texts, targets, cos, soft_weight=DEFAULT_SOFT_WEIGHT, f1_weight=DEFAULT_F1_WEIGHT):
    """HSR of every answer against its target: texts, targets [N] strings, cos [N] -> float32 tensor [N]."""
    check_lengths("hsr_rewards", texts, targets, cos)
    check_hsr_weights(soft_weight, f1_weight)
    cos = cos.tolist() if torch.is_tensor(cos) else cos  # one device sync for the whole batch
    return torch.tensor([hsr(t, ref, c, soft_weight, f1_weight) for t, ref, c in zip(texts, targets, cos)],
                        dtype=torch.float32)


def exact_rewards(texts, targets):
    """1 for an answer equal (normalised) to its target, else 0: texts, targets [N] -> float32 tensor [N]."""
    check_lengths("exact_rewards", texts, targets)
    return torch.tensor([exact_match(t, ref) for t, ref in zip(texts, targets)], dtype=torch.float32)


def f1_rewards(texts, targets):
    """Token F1 of every answer against its target: texts, targets [N] -> float32 tensor [N]."""
    check_lengths("f1_rewards", texts, targets)
    return torch.tensor([token_f1(t, ref) for t, ref in zip(texts, targets)], dtype=torch.float32)


def check_lengths(where, texts, *others):
    for other in others:
        if other is None or len(other) != len(texts):
            raise ValueError(f"{where}: {len(texts)} answers but {None if other is None else len(other)} targets "
                             f"or cosines")
