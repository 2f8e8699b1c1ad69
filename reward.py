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

compute_rewards() scores a whole batch of groups and also offers the ablation
rewards: "exact" (hard tier only), "f1" (token F1 only), "oracle" (exact match
against the ground truth: the supervised upper bound, for ablation tables only;
it uses labels Med-Evo never sees) and "noisy-oracle" (HSR against a label of
known accuracy p, centroid.noisy_oracle_labels: where does a pseudo label of
accuracy p break even with the base model?).

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
REWARD_KINDS = ("hsr", "exact", "f1", "oracle", "noisy-oracle")

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


def compute_rewards(texts, group_size, labels, cos, kind="hsr", refs=None,
                    soft_weight=DEFAULT_SOFT_WEIGHT, f1_weight=DEFAULT_F1_WEIGHT):
    """Reward every answer of every group; returns a float32 tensor [N].

    texts:  N = B * group_size decoded answers, group g at texts[g*G:(g+1)*G]
    labels: B pseudo-label indices within their group (FPL or majority vote)
    cos:    N cosines of each answer to its group's pseudo label (needed for "hsr" only)
    kind:   "hsr" | "exact" | "f1" vs the pseudo label, "oracle" = exact match vs refs, or
            "noisy-oracle" = HSR vs refs (cos then holds each answer's cosine to its refs label)
    refs:   B target texts, one per group: the ground truth ("oracle") or the noisy label ("noisy-oracle")
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"compute_rewards: unknown reward kind {kind!r}, expected one of {REWARD_KINDS}")
    n = len(texts)
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"compute_rewards: {n} answers do not split into groups of {group_size}")
    n_groups = n // group_size
    labels = [int(i) for i in labels]
    if len(labels) != n_groups:
        raise ValueError(f"compute_rewards: {len(labels)} labels for {n_groups} groups")
    if any(not 0 <= i < group_size for i in labels):
        raise ValueError(f"compute_rewards: pseudo-label index out of range [0, {group_size}): {labels}")
    if kind in ("hsr", "noisy-oracle"):
        if cos is None or len(cos) != n:
            raise ValueError(f"compute_rewards: kind='hsr' needs {n} cosines, got {None if cos is None else len(cos)}")
        check_hsr_weights(soft_weight, f1_weight)
    if kind in ("oracle", "noisy-oracle"):
        if refs is None or len(refs) != n_groups or any(r is None for r in refs):
            raise ValueError(f"compute_rewards: kind={kind!r} needs one ground-truth answer per group in refs "
                             f"(got {refs!r}); unlabeled data cannot use an oracle reward")

    labels = [int(i) for i in labels]  # one device sync for the whole batch, not one per answer
    cos = cos.tolist() if torch.is_tensor(cos) else cos
    rewards = []
    for i, text in enumerate(texts):
        g = i // group_size
        pseudo = texts[g * group_size + labels[g]]
        if kind == "hsr":
            rewards.append(hsr(text, pseudo, float(cos[i]), soft_weight, f1_weight))
        elif kind == "exact":
            rewards.append(exact_match(text, pseudo))
        elif kind == "f1":
            rewards.append(token_f1(text, pseudo))
        elif kind == "oracle":
            rewards.append(exact_match(text, refs[g]))
        else:  # noisy-oracle
            rewards.append(hsr(text, refs[g], float(cos[i]), soft_weight, f1_weight))
    return torch.tensor(rewards, dtype=torch.float32)
