"""Low-consensus groups (RESTRAIN, EMPO): an advantage rule for groups whose pseudo label few answers share.

A group whose pseudo label holds less than a share kappa (--consensus-min) of its votes is not trusted:
  "penalize" (RESTRAIN, Yu et al. 2025, arXiv 2510.02172, "negative rollout penalization"): its rewards
             are set to 0 and every advantage is shifted by -delta,  A~_i = A_i - delta  (A_i = 0 once the
             rewards are equal), a small push away from all of its answers;
  "drop"     (EMPO, Zhang et al. 2025, arXiv 2504.05812): the group is left out of the loss (no gradient at
             all, the KL term included) and out of seq-mean's answer count. EMPO's code (QingyangZhang/EMPO)
             zeroes the group's rewards instead (no advantage; its KL term stays): in trl/src/open_r1/rewards.py
             when the answers' semantic entropy reaches log(n) (every answer distinct), in
             verl-empo/verl/utils/reward_score/empo/compute_metrics.py (entropy_thresholding, commented out
             there) when the top answer's share is below 0.25, the value the ttrl-empo ablation row uses.
RESTRAIN thresholds the majority COUNT, M(x) < kappa; we threshold the share M(x) / N, so one kappa fits
every --label-samples. RESTRAIN's values of kappa and delta were not reachable to us (we found no public
code, and the paper's hyperparameter appendix was not in our sources); the flags are off by default (kappa = 0), the
ablation rows use kappa = 0.5 (the label must hold half the votes) and delta = 0.1 (a tenth of a typical
group-normalised advantage). Its pseudo-label weighting (every distinct answer a label, weighted by a
function of its vote share) and prompt weighting are not implemented.

The interface (rules/__init__.py's ADVANTAGES): fn(run, rewards [B*G], shares [B]) -> grpo.Advantages.
"""

import torch

import grpo

RULES = ("penalize", "drop")  # RESTRAIN, EMPO
DEFAULT_PENALTY_DELTA = 0.1  # RESTRAIN's delta was not reachable to us: the module docstring


def penalize(run, rewards, shares):
    """RESTRAIN: an untrusted group's rewards -> 0, its advantages -> -delta."""
    args = run.args
    untrusted = untrusted_rows(shares, args.group_size, args.consensus_min, rewards.device)  # [B*G]
    rewards = rewards.masked_fill(untrusted, 0.0)
    advantages = grpo.group_advantages(rewards, args.group_size, scale=args.adv_scale)
    advantages = advantages - args.penalty_delta * untrusted.float()
    return grpo.Advantages(rewards, advantages, None, untrusted_share(shares, args.consensus_min))


def drop(run, rewards, shares):
    """EMPO: an untrusted group is left out of the loss (keep = False on its rows)."""
    args = run.args
    untrusted = untrusted_rows(shares, args.group_size, args.consensus_min, rewards.device)  # [B*G]
    advantages = grpo.group_advantages(rewards, args.group_size, scale=args.adv_scale)
    return grpo.Advantages(rewards, advantages, ~untrusted, untrusted_share(shares, args.consensus_min))


def untrusted_rows(shares, group_size, min_share, device):
    """[B*G] bool: True on every answer of a group whose label's vote share is below min_share."""
    return (torch.as_tensor(shares, dtype=torch.float32, device=device) < min_share).repeat_interleave(group_size)


def untrusted_share(shares, min_share):
    return sum(share < min_share for share in shares) / len(shares)


# ----------------------------------------------------------------------------------------------
# Flags and checks


def add_flags(group):
    group.add_argument("--consensus-min", type=float, default=0.0,
                       help="kappa: a group whose pseudo label holds a vote share below it is untrusted (RESTRAIN, "
                            "arXiv 2510.02172; EMPO, 2504.05812); 0 = off. RESTRAIN's own kappa was not reachable "
                            "to us (rules/low_consensus.py); the ablation rows use 0.5")
    group.add_argument("--low-consensus", default="penalize", choices=RULES,
                       help="an untrusted group: penalize = rewards 0 and advantages -delta (RESTRAIN), drop = no "
                            "gradient (EMPO)")
    group.add_argument("--penalty-delta", type=float, default=DEFAULT_PENALTY_DELTA,
                       help="delta of --low-consensus penalize (RESTRAIN's value was not reachable to us; 0.1)")


RANGES = [("consensus_min", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
          ("penalty_delta", lambda v: v >= 0, ">= 0")]


def advantage_rule(args):
    """The ADVANTAGES entry the flags choose: this rule's, or None (the plain group advantages)."""
    return args.low_consensus if args.consensus_min > 0 else None
