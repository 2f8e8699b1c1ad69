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

Two label-light rewards from the collapse-resistance literature (issue 18):

  "entropy" (RENT, Prabhudesai et al. 2025, arXiv 2505.22660; EM-RL, Agarwal et al. 2025, arXiv 2505.15134):
             reward = minus the mean token entropy of the answer under the policy,
                 r_i = -(1 / |y_i|) sum_t H_t,   H_t = -sum_v p_t(v) log p_t(v),
             no label at all (entropy_rewards). The logits are the first update's teacher-forced pass on
             the fresh rollout: the sampling policy's, detached (the "old" logits), at temperature 1, over
             every answer token including EOS (our answers are a few words: there is no reasoning span to
             leave out).
  novelty    (EVOL-RL, Zhou et al. 2025, arXiv 2509.15194; YujunZhou/EVOL-RL,
             verl/verl/workers/reward_manager/semantic_novelty.py, _compute_similarity_based_rewards):
             REPLACES the reward (EVOL-RL replaces TTRL's): novelty_rewards below.

The text metrics are written by hand (no external metric library) following the
SQuAD v1.1 evaluation script: lowercase, strip punctuation, drop a/an/the,
collapse whitespace; F1 over the multiset of words.
"""

import re
import string
from collections import Counter

import torch
import torch.nn.functional as F

DEFAULT_SOFT_WEIGHT = 0.5
DEFAULT_F1_WEIGHT = 0.5
REWARD_KINDS = ("hsr", "exact", "f1", "oracle", "noisy-oracle", "entropy")

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
    refs:   B target texts, one per group: the ground truth ("oracle") or the noisy label ("noisy-oracle"); for
            "hsr" | "exact" | "f1", labels from outside the group that replace the pseudo labels (the EMA
            teacher's; cos then holds each answer's cosine to its refs label, centroid.cosine_to_label_texts)
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"compute_rewards: unknown reward kind {kind!r}, expected one of {REWARD_KINDS}")
    if kind == "entropy":
        raise ValueError("compute_rewards: the entropy reward reads the logits, not the texts: use entropy_rewards")
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
        target = texts[g * group_size + labels[g]] if refs is None else refs[g]  # the oracles always have refs
        if kind in ("hsr", "noisy-oracle"):
            rewards.append(hsr(text, target, float(cos[i]), soft_weight, f1_weight))
        elif kind in ("exact", "oracle"):
            rewards.append(exact_match(text, target))
        else:  # f1
            rewards.append(token_f1(text, target))
    return torch.tensor(rewards, dtype=torch.float32)


# -----------------------------------------------------------------------------
# Entropy reward (RENT)

@torch.no_grad()
def entropy_rewards(logits, mask):
    """Minus the mean token entropy of each answer: logits [N, T, V] (the policy's, aligned with the answer
    tokens), mask [N, T] -> [N] float32 (<= 0). An answer with an empty mask gets 0.

    One answer at a time in float32, as grpo.token_logprobs, so the copy of the logits is only ever [T, V].
    """
    if logits.dim() != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"entropy_rewards: need logits [N, T, V] and mask [N, T], "
                         f"got {tuple(logits.shape)} and {tuple(mask.shape)}")
    rewards = []
    for row_logits, row_mask in zip(logits.detach(), mask.float()):
        p = torch.softmax(row_logits.float(), dim=-1)  # [T, V]
        entropy = torch.special.entr(p).sum(dim=-1)  # [T]  H_t = -sum_v p log p  (entr(0) = 0: no 0 * -inf)
        entropy = torch.where(row_mask > 0, entropy, torch.zeros_like(entropy))  # padding may hold anything
        rewards.append(-entropy.sum() / row_mask.sum().clamp(min=1.0))
    return torch.stack(rewards)


# -----------------------------------------------------------------------------
# Novelty shaping (EVOL-RL)

@torch.no_grad()
def novelty_rewards(emb, texts, group_size, label_texts):
    """EVOL-RL's reward of every answer: [N, D] embeddings, N = B * group_size texts, B label texts -> [N].

    Per group, as semantic_novelty.py does it (its "correct" = our majority: the answers equal, exact_match,
    to the group's label; its "incorrect" = the rest; its "group" = all the votes of one prompt):
      sim_ij     = clip(cos(e_i, e_j), 0, 1)
      novelty_i  = 1 - (0.5 * mean_j sim_ij over the other answers of i's own class
                        + 0.5 * max_j sim_ij over every other answer of the group)
                   (a class of one takes the mean over every other answer instead)
      min-max normalised within each class, then
      majority:  0.5 + 0.5 * novelty   (a lone majority answer: 1.0;  all novelties equal: 0.75)
      the rest: -1.0 + 0.5 * novelty   (a lone other answer:   -0.5;  all novelties equal: -0.75)
    Their embeddings come from an external embedding model (Qwen3-Embedding-4B) on the text after </think>;
    ours are the policy's own answer embeddings, as FPL's (centroid.answer_embeddings). Their -1 for an
    answer without a valid boxed final answer has no counterpart here.
    """
    if emb.dim() != 2 or emb.shape[0] != len(texts) or len(texts) % group_size:
        raise ValueError(f"novelty_rewards: need [N, D] embeddings for N = B * {group_size} texts, got "
                         f"{tuple(emb.shape)} for {len(texts)} texts")
    if len(label_texts) != len(texts) // group_size:
        raise ValueError(f"novelty_rewards: {len(label_texts)} labels for {len(texts) // group_size} groups")
    unit = F.normalize(emb.detach().float().cpu(), dim=-1).view(-1, group_size, emb.shape[1])  # [B, G, D]
    sim = (unit @ unit.transpose(1, 2)).clamp(0.0, 1.0)  # [B, G, G]
    rewards = []
    for g, label in enumerate(label_texts):
        majority = torch.tensor([exact_match(t, label) == 1.0 for t in texts[g * group_size:(g + 1) * group_size]])
        novelty = group_novelty(sim[g], majority)  # [G]
        rewards.append(torch.where(majority, 0.5 + 0.5 * class_scaled(novelty, majority),
                                   -1.0 + 0.5 * class_scaled(novelty, ~majority)))
    return torch.cat(rewards).float()


def group_novelty(sim, majority):
    """novelty_i = 1 - (0.5 * mean similarity to i's own class + 0.5 * max similarity to the group): [G, G] -> [G]."""
    G = sim.shape[0]
    others = ~torch.eye(G, dtype=torch.bool)  # [G, G] j != i
    same = others & (majority[:, None] == majority[None, :])  # j != i in i's class
    pool = torch.where(same.any(dim=1, keepdim=True), same, others)  # a class of one: every other answer
    mean_sim = (sim * pool).sum(dim=1) / pool.sum(dim=1).clamp(min=1)
    max_sim = sim.masked_fill(~others, float("-inf")).max(dim=1).values if G > 1 else torch.full((G,), 0.5)
    mean_sim = mean_sim if G > 1 else torch.full((G,), 0.5)  # semantic_novelty.py's value for a lone answer
    return 1.0 - (0.5 * mean_sim + 0.5 * max_sim)


def class_scaled(novelty, members):
    """Min-max scale novelty within the members to [0, 1]; a lone member gets 1 (its reward 1.0 / -0.5),
    members of equal novelty 0.5 (0.75 / -0.75). Non-members get 0 (the caller discards them)."""
    values = novelty[members]
    if values.numel() == 0:
        return torch.zeros_like(novelty)
    low, high = values.min(), values.max()
    if values.numel() == 1:
        scaled = torch.ones_like(novelty)
    elif high > low:
        scaled = (novelty - low) / (high - low)
    else:
        scaled = torch.full_like(novelty, 0.5)
    return torch.where(members, scaled, torch.zeros_like(novelty))
