"""Entropy reward (RENT): reward an answer for the policy's confidence in it, with no label at all.

RENT (Prabhudesai et al. 2025, arXiv 2505.22660; EM-RL, Agarwal et al. 2025, arXiv 2505.15134):
    r_i = -(1 / |y_i|) sum_t H_t,   H_t = -sum_v p_t(v) log p_t(v),
minus the mean token entropy of the answer under the policy. The logits are the first update's teacher-forced
pass on the fresh rollout: the sampling policy's, detached (the "old" logits), at temperature 1, over every
answer token including EOS (our answers are a few words: there is no reasoning span to leave out).

`--reward entropy`. The interface (rules/__init__.py's REWARDS): fn(run, batch, labels) -> [B*G]; the label is
computed (for the logs) but not read.
"""

import torch


def rewards(run, batch, labels):
    """REWARDS["entropy"]: minus each trained answer's mean token entropy [B*G]."""
    return entropy_rewards(batch.logits, batch.trained.completion_mask)


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


