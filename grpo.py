"""GRPO: group-relative advantages and the clipped policy loss with a k3 KL penalty.

Med-Evo (arXiv 2603.07443) trains the policy with GRPO (Group Relative Policy
Optimization, DeepSeekMath, Shao et al. 2024) on the HSR rewards of its own samples:

  advantage  A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     per answer, no critic
  ratio      rho_t = exp(logp_t - old_logp_t)                         per token
  policy     -min(rho_t * A_i, clip(rho_t, 1 - clip_eps, 1 + clip_eps) * A_i)   (PPO clip)
  KL         k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (Schulman's k3: unbiased,
             always >= 0, estimates KL(policy || reference) from samples of the policy)
  per token  policy + kl_coef * k3_t

Dr. GRPO (Liu et al. 2025) argues that dividing by the group std biases the update
towards groups with little reward spread; scale="none" keeps only the mean-centring.

Aggregation over tokens: agg="seq-mean" is the original GRPO (mean over each
answer's tokens, then over answers, so every answer weighs the same whatever its
length); agg="token-mean" (DAPO, Yu et al. 2025) averages over all tokens of the
batch, so long answers weigh more.

The research rules that change how advantages are formed (RESTRAIN's penalty and EMPO's drop of
low-consensus groups) live in rules/low_consensus.py; they hand back the same `Advantages` as the plain
group_advantages does here.

Everything here is written by hand in plain torch; shapes are N answers x T tokens.
"""

from dataclasses import dataclass

import torch

ADV_SCALES = ("std", "none")  # GRPO, Dr. GRPO
LOSS_AGGS = ("seq-mean", "token-mean")  # GRPO, DAPO


@dataclass
class Advantages:
    """What the update needs of the rewards: the hand-off from step 5 to step 7."""
    rewards: torch.Tensor  # [N] the rewards the advantages were formed from (a rule may change them)
    advantages: torch.Tensor  # [N]
    keep: torch.Tensor | None = None  # [N] bool: False on rows left out of the loss (a rule's dropped groups)
    untrusted: float = 0.0  # share of the groups a rule did not trust (0 without one)


def group_advantages(rewards, group_size, scale="std", eps=1e-4):
    """Group-relative advantages: rewards [N] -> [N] float32.

    scale="std": (r - group mean) / (group std + eps), std unbiased as torch.std;
    scale="none": r - group mean (Dr. GRPO). A group of equal rewards gets exactly 0.
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}, expected one of {ADV_SCALES}")
    if rewards.dim() != 1 or group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_advantages: rewards of shape {tuple(rewards.shape)} "
                         f"do not split into groups of group_size={group_size}")
    if scale == "std" and group_size < 2:
        raise ValueError("group_advantages: scale='std' needs group_size >= 2 (std of one sample is undefined)")
    r = rewards.detach().float().view(-1, group_size)  # [B, G]
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # round-off in the mean must not leak through
    return advantages.masked_fill(all_equal, 0.0).view(-1)


def token_logprobs(logits, tokens):
    """log p(token) under the logits: logits [N, T, V] (aligned with tokens), tokens [N, T] -> [N, T] float32.

    Computed as logit[token] - logsumexp(logits), one answer at a time, so the float32
    copy of a bf16 vocabulary-sized tensor is only ever [T, V].
    """
    if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"token_logprobs: need logits [N, T, V] and tokens [N, T], "
                         f"got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logits = row_logits.float()  # [T, V]
        picked = row_logits.gather(-1, row_tokens.long()[:, None]).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def masked_mean(x, mask):
    """Mean of x over positions where mask > 0 (0 if there are none)."""
    x = torch.where(mask > 0, x, torch.zeros_like(x))  # padding may hold inf; inf * 0 would be nan
    return x.sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.04, agg="seq-mean", keep=None):
    """Clipped GRPO loss. Returns (loss, stats).

    logp      [N, T] log-probs of the sampled tokens under the policy being trained (with grad)
    old_logp  [N, T] log-probs under the policy that sampled them (no grad)
    ref_logp  [N, T] log-probs under the frozen reference model, or None when kl_coef == 0
    advantages [N], mask [N, T] (1 on answer tokens)
    keep      [N] bool or None: rows left out (False: a group a rule dropped, Advantages.keep) give no loss, no
              gradient, no statistics, and do not count as answers in seq-mean (per rank, as the mean is)
    stats: python floats kl (masked mean k3; nan when ref_logp is None), clip_frac
    (share of answer tokens where the clipped branch is active), ratio_mean.
    Answers with an empty mask contribute 0 but still count as answers in seq-mean.
    """
    if agg not in LOSS_AGGS:
        raise ValueError(f"grpo_loss: unknown agg {agg!r}, expected one of {LOSS_AGGS}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError(f"grpo_loss: kl_coef={kl_coef} needs ref_logp (pass kl_coef=0 to train without a reference)")
    shape = tuple(logp.shape)
    named = {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}, logp has {shape}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"grpo_loss: advantages has shape {tuple(advantages.shape)}, need ({shape[0]},)")

    if keep is not None and tuple(keep.shape) != shape[:1]:
        raise ValueError(f"grpo_loss: keep has shape {tuple(keep.shape)}, need ({shape[0]},)")

    mask = mask.float() if keep is None else mask.float() * keep.float()[:, None]  # dropped rows: no tokens
    adv = advantages.detach().float()[:, None]  # [N, 1]
    ratio = torch.exp(logp - old_logp.detach())  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)

    k3 = None
    if ref_logp is not None:
        delta = ref_logp.detach() - logp
        k3 = torch.exp(delta) - delta - 1.0
        if kl_coef != 0:
            per_token = per_token + kl_coef * k3

    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    if agg == "seq-mean":
        per_answer = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        loss = per_answer.mean() if keep is None else per_answer.sum() / keep.sum().clamp(min=1)
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1.0)

    with torch.no_grad():
        clip_active = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
        stats = {
            "kl": masked_mean(k3, mask).item() if k3 is not None else float("nan"),
            "clip_frac": masked_mean(clip_active.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats
