"""Novelty shaping (EVOL-RL): reward agreement with the label, and among agreeing answers, novelty.

EVOL-RL (Zhou et al. 2025, arXiv 2509.15194; YujunZhou/EVOL-RL,
verl/verl/workers/reward_manager/semantic_novelty.py, _compute_similarity_based_rewards) REPLACES the reward
(EVOL-RL replaces TTRL's): novelty_rewards below, over all N label samples of a question.

`--novelty` (on top of a label rule: majority for EVOL-RL). The interface (rules/__init__.py's REWARDS):
fn(run, batch, labels) -> [B*G].
"""

import torch
import torch.nn.functional as F

from reward import exact_match


def rewards(run, batch, labels):
    """REWARDS["novelty"]: EVOL-RL's reward of each trained answer, from its group of N label samples."""
    return batch.first_of_each_group(novelty_rewards(batch.emb, batch.texts, batch.label_samples, labels.texts))


def add_flags(group):
    group.add_argument("--novelty", action="store_true",
                       help="EVOL-RL (arXiv 2509.15194) novelty shaping: REPLACES the reward with 0.5 + 0.5 * "
                            "novelty for answers equal to the label and -1 + 0.5 * novelty for the others "
                            "(rules/novelty.py)")


def check(args):
    if args.novelty and args.reward in ("entropy", "oracle", "noisy-oracle"):
        raise SystemExit(f"--novelty replaces the reward against the pseudo label: it cannot shape --reward "
                         f"{args.reward} (use exact or hsr)")


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
