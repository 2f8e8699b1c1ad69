"""Feature-driven Pseudo Labeling (FPL): pick each question's pseudo label from answer embeddings.

Med-Evo (arXiv 2603.07443), step 3. TTRL takes the majority vote over answer strings; Med-Evo takes FPL:
every sampled answer is embedded by the policy itself (mean of its last-layer hidden states over the answer
tokens), the G embeddings of a question are L2-normalised and averaged into a group centroid, and the answer
closest to that centroid (highest cosine) becomes the pseudo label. Answers that say the same thing in
different words fall into one cluster, so FPL does not need exact string agreement.

The hidden states come from the same teacher-forced pass that gives the policy's log-probs for GRPO
(rollout.completion_logits_and_hidden), so FPL costs no extra forward pass.

Pseudo labels are targets, not something to differentiate: everything here runs under torch.no_grad on
detached float32 copies (the model may run in bf16).

The hand-off to the reward (step 4) is a `PseudoLabels`: one label text per question and each answer's
cosine to its question's label (HSR's soft tier). `fpl()` and `majority()` make one; `from_texts()` makes one
for a label that comes from outside the group (the research rules' EMA teacher and noisy oracle, rules/).
"""

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reward import exact_match, normalize_answer

PSEUDO_LABELS = ("fpl", "majority")  # Med-Evo, TTRL


def check_groups(n, group_size, where):
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{where}: {n} answers do not split into groups of group_size={group_size}")


@torch.no_grad()
def answer_embeddings(hidden, mask):
    """Mean hidden state over each answer's tokens: hidden [N, T, D], mask [N, T] -> [N, D] float32.

    An answer with an empty mask gets the zero vector (token count clamped to 1).
    """
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"answer_embeddings: need hidden [N, T, D] and mask [N, T], "
                         f"got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    mask = mask.detach().float()
    summed = torch.einsum("ntd,nt->nd", hidden.detach().float(), mask)  # [N, D]
    count = mask.sum(dim=1).clamp(min=1.0)  # [N]
    return summed / count[:, None]


def unit_groups(emb, group_size, where):
    """L2-normalise rows and reshape [N, D] -> [B, G, D] (zero rows stay zero)."""
    if emb.dim() != 2:
        raise ValueError(f"{where}: need embeddings [N, D], got {tuple(emb.shape)}")
    check_groups(emb.shape[0], group_size, where)
    unit = F.normalize(emb.detach().float(), dim=-1)
    return unit.view(-1, group_size, emb.shape[1])


@torch.no_grad()
def centroid_cosines(emb, group_size):
    """Cosine of each answer to its group centroid (mean of unit embeddings): [N, D] -> [N]."""
    unit = unit_groups(emb, group_size, "centroid_cosines")  # [B, G, D]
    centroid = F.normalize(unit.mean(dim=1), dim=-1)  # [B, D]
    return torch.einsum("bgd,bd->bg", unit, centroid).reshape(-1)


@torch.no_grad()
def fpl_pseudo_labels(emb, group_size):
    """Index within each group of the answer closest to the group centroid: [N, D] -> LongTensor [B].

    Ties go to the lowest index.
    """
    cos = centroid_cosines(emb, group_size).view(-1, group_size)  # [B, G]
    is_best = cos == cos.max(dim=1, keepdim=True).values
    index = torch.arange(group_size, device=cos.device).expand_as(cos)
    return torch.where(is_best, index, group_size).min(dim=1).values


@torch.no_grad()
def cosine_to_pseudo_label(emb, group_size, labels):
    """Cosine of each answer to its group's pseudo-label answer: [N, D] -> [N] (HSR's soft tier)."""
    unit = unit_groups(emb, group_size, "cosine_to_pseudo_label")  # [B, G, D]
    labels = torch.as_tensor(labels, dtype=torch.long, device=unit.device)
    if labels.shape != (unit.shape[0],) or labels.min() < 0 or labels.max() >= group_size:
        raise ValueError(f"cosine_to_pseudo_label: need {unit.shape[0]} labels in [0, {group_size}), "
                         f"got {labels.tolist()}")
    label_unit = unit[torch.arange(unit.shape[0], device=unit.device), labels]  # [B, D]
    return torch.einsum("bgd,bd->bg", unit, label_unit).reshape(-1)


def majority_vote(texts, group_size):
    """TTRL baseline: per group, the first answer whose normalised text is the most frequent."""
    check_groups(len(texts), group_size, "majority_vote")
    labels = []
    for start in range(0, len(texts), group_size):
        normalised = [normalize_answer(t) for t in texts[start:start + group_size]]
        counts = Counter(normalised)
        top = max(counts.values())
        labels.append(next(i for i, t in enumerate(normalised) if counts[t] == top))
    return labels


def label_texts(texts, group_size, labels):
    """The text of each group's pseudo label: labels [B] index within each group of G consecutive texts."""
    check_groups(len(texts), group_size, "label_texts")
    return [texts[g * group_size + int(i)] for g, i in enumerate(labels)]


def label_of_each_answer(label_texts, group_size):
    """Each answer's target: the label of its question, repeated for the group's G answers ([B] -> [B*G])."""
    return [label for label in label_texts for _ in range(group_size)]


def label_shares(texts, group_size, label_texts):
    """Vote share of each group's label: the share of its answers equal (normalised, reward.exact_match) to the
    group's label text. texts: B*G answers; label_texts: B -> list of B floats in [0, 1].

    For a majority label this is TTRL's majority ratio; for an FPL label, the share of answers that say the
    label word for word (an FPL label nearest the centroid may stand alone in its group)."""
    check_groups(len(texts), group_size, "label_shares")
    if len(label_texts) != len(texts) // group_size:
        raise ValueError(f"label_shares: {len(label_texts)} labels for {len(texts) // group_size} groups")
    return [sum(exact_match(t, label) for t in texts[g * group_size:(g + 1) * group_size]) / group_size
            for g, label in enumerate(label_texts)]


@dataclass
class PseudoLabels:
    """One pseudo label per question, and what HSR needs of it."""
    texts: list  # [B] the label's text
    cos: torch.Tensor  # [B*N] each answer's cosine to its question's label (HSR's soft tier)


def fpl(emb, texts, group_size):
    """Med-Evo's label: the answer nearest its group's centroid. emb [B*N, D], texts [B*N] -> PseudoLabels."""
    index = fpl_pseudo_labels(emb, group_size)  # [B]
    return PseudoLabels(label_texts(texts, group_size, index), cosine_to_pseudo_label(emb, group_size, index))


def majority(emb, texts, group_size):
    """TTRL's label: the most frequent answer (normalised). emb [B*N, D], texts [B*N] -> PseudoLabels."""
    index = torch.tensor(majority_vote(texts, group_size))  # [B]
    return PseudoLabels(label_texts(texts, group_size, index), cosine_to_pseudo_label(emb, group_size, index))


def from_texts(emb, texts, group_size, labels):
    """A label chosen outside the group (B texts): each answer's cosine to the first answer equal to it."""
    return PseudoLabels(list(labels), cosine_to_label_texts(emb, texts, group_size, labels))


def pseudo_labels(kind, emb, texts, group_size):
    """Each group's pseudo-label index [B]: "fpl" (Med-Evo) from the embeddings, "majority" (TTRL) from the texts."""
    if kind == "fpl":
        return fpl_pseudo_labels(emb, group_size)
    return torch.tensor(majority_vote(texts, group_size))


@torch.no_grad()
def cosine_to_label_texts(emb, texts, group_size, label_texts):
    """Cosine of each answer to the first answer of its group equal (normalised) to the group's label text;
    0 for every answer of a group where no answer equals it (a label from outside the group has no
    embedding here): [N, D] -> [N]."""
    unit = unit_groups(emb, group_size, "cosine_to_label_texts")  # [B, G, D]
    cos = torch.zeros(unit.shape[:2])  # [B, G]
    for g, label in enumerate(label_texts):
        group = [normalize_answer(t) for t in texts[g * group_size:(g + 1) * group_size]]
        if normalize_answer(label) in group:
            cos[g] = unit[g] @ unit[g, group.index(normalize_answer(label))]
    return cos.reshape(-1)
