"""Tests for grpo.py against hand-computed advantages, losses, KL values and gradients."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo import group_advantages, grpo_loss, token_logprobs  # noqa: E402

LN2 = math.log(2.0)


def test_group_advantages_hand_computed():
    # group 0: [2, 0, 1], mean 1, centred [1, -1, 0], unbiased std sqrt(2 / 2) = 1
    # group 1: [0.1, 0.1, 0.1] -> exactly 0
    rewards = torch.tensor([2.0, 0.0, 1.0, 0.1, 0.1, 0.1])
    adv = group_advantages(rewards, 3)
    assert adv.tolist()[:3] == pytest.approx([1 / 1.0001, -1 / 1.0001, 0.0], abs=1e-7)
    assert adv.tolist()[3:] == [0.0, 0.0, 0.0]
    # eight rewards of 0.3: the float32 mean is off by ~3e-8, which without the equal-group
    # guard would become an advantage of ~3e-4 (the tiny std is swamped by eps)
    assert group_advantages(torch.full((8,), 0.3), 8).tolist() == [0.0] * 8
    assert group_advantages(rewards, 3, scale="none").tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    # [1, 0, 0, 0]: mean 1/4, centred [3/4, -1/4, -1/4, -1/4], var (9/16 + 3/16) / 3 = 1/4, std 1/2
    adv4 = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    assert adv4.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="'mad'"):
        group_advantages(torch.zeros(6), 3, scale="mad")


def test_token_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7) * 3
    tokens = torch.randint(0, 7, (2, 4))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens), expected, atol=1e-5)
    bf16 = logits.bfloat16()
    out = token_logprobs(bf16, tokens)
    assert out.dtype == torch.float32
    expected_bf16 = torch.log_softmax(bf16.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(out, expected_bf16, atol=1e-5)


# Hand example: 2 answers x 3 tokens, clip_eps = 0.2.
#   answer 0: A = +1, mask [1, 1, 0], ratios [1.5, 0.5, (pad)]
#     tok0 ratio 1.5 > 1.2, A > 0 -> clipped:   -min(1.5, 1.2)   = -1.2
#     tok1 ratio 0.5 < 0.8, A > 0 -> unclipped: -min(0.5, 0.8)   = -0.5
#   answer 1: A = -1, mask [1, 1, 1], ratios [0.5, 1.5, 1.0]
#     tok0 ratio 0.5 < 0.8, A < 0 -> clipped:   -min(-0.5, -0.8) = +0.8
#     tok1 ratio 1.5 > 1.2, A < 0 -> unclipped: -min(-1.5, -1.2) = +1.5
#     tok2 ratio 1.0                            -min(-1, -1)     = +1.0
#   ref - logp: answer 0 [ln2, 0, (pad)], answer 1 [-ln2, 0, ln2]
#     k3(ln2) = 2 - ln2 - 1 = 1 - ln2;  k3(-ln2) = 1/2 + ln2 - 1 = ln2 - 1/2;  k3(0) = 0
LOGP = torch.tensor([[-1.0, -2.0, 0.3], [-0.5, -1.5, -3.0]])
RATIO = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]])
DELTA = torch.tensor([[LN2, 0.0, 0.0], [-LN2, 0.0, LN2]])
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def hand_inputs():
    logp = LOGP.clone().requires_grad_(True)
    return logp, LOGP - torch.log(RATIO), LOGP + DELTA


def test_grpo_loss_policy_term_and_clipping_hand_computed():
    logp, old, ref = hand_inputs()
    loss, stats = grpo_loss(logp, old, ref, ADV, MASK, clip_eps=0.2, kl_coef=0.0, agg="seq-mean")
    # answer means: (-1.2 - 0.5) / 2 = -0.85 and (0.8 + 1.5 + 1.0) / 3 = 1.1 -> 0.125
    assert loss.item() == pytest.approx(0.125, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)
    assert stats["kl"] == pytest.approx((1 - LN2 + 0 + LN2 - 0.5 + 0 + 1 - LN2) / 5, abs=1e-6)
    # token-mean: (-1.2 - 0.5 + 0.8 + 1.5 + 1.0) / 5 = 0.32, differs from seq-mean on unequal lengths
    loss_tok, _ = grpo_loss(logp, old, ref, ADV, MASK, clip_eps=0.2, kl_coef=0.0, agg="token-mean")
    assert loss_tok.item() == pytest.approx(0.32, abs=1e-6)


def test_grpo_loss_with_k3_kl_hand_computed():
    logp, old, ref = hand_inputs()
    loss, _ = grpo_loss(logp, old, ref, ADV, MASK, clip_eps=0.2, kl_coef=0.1, agg="seq-mean")
    answer0 = (-1.2 + 0.1 * (1 - LN2) - 0.5) / 2
    answer1 = (0.8 + 0.1 * (LN2 - 0.5) + 1.5 + 1.0 + 0.1 * (1 - LN2)) / 3  # = 3.35 / 3
    assert loss.item() == pytest.approx((answer0 + answer1) / 2, abs=1e-6)
    loss_tok, _ = grpo_loss(logp, old, ref, ADV, MASK, clip_eps=0.2, kl_coef=0.1, agg="token-mean")
    assert loss_tok.item() == pytest.approx((1.6 + 0.1 * (1.5 - LN2)) / 5, abs=1e-6)


def test_grpo_loss_gradient_matches_hand_formula():
    # d/dlogp per token: policy -A * ratio unless clipping bites (then 0); KL kl_coef * (1 - exp(ref - logp));
    # seq-mean weight 1 / (N * answer length); padding 0.
    logp, old, ref = hand_inputs()
    loss, _ = grpo_loss(logp, old, ref, ADV, MASK, clip_eps=0.2, kl_coef=0.1, agg="seq-mean")
    loss.backward()
    expected = torch.tensor([[(0.0 + 0.1 * (1 - 2)) / 4, (-0.5 + 0.0) / 4, 0.0],
                             [(0.0 + 0.1 * (1 - 0.5)) / 6, (1.5 + 0.0) / 6, (1.0 + 0.1 * (1 - 2)) / 6]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_grpo_loss_gradient_zero_on_clipped_tokens_without_kl():
    logp, old, ref = hand_inputs()
    loss, _ = grpo_loss(logp, old, None, ADV, MASK, clip_eps=0.2, kl_coef=0.0, agg="token-mean")
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0  # the two clipped tokens
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 / 5)  # unclipped ones: -A * ratio / n_tokens
    assert logp.grad[1, 1].item() == pytest.approx(1.5 / 5)


def test_on_policy_start_ratio_one_and_zero_kl():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_(True)
    adv = torch.tensor([0.5, -1.5, 2.0])
    mask = torch.ones(3, 4)
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.04)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["kl"] == 0.0 and stats["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item())  # per token -A * 1


def test_equal_rewards_give_no_policy_gradient_and_no_nan():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    logp = (-torch.rand(6, 2)).requires_grad_(True)
    old = logp.detach() + 0.3  # ratio exp(-0.3) ~ 0.74: off-policy, clipping in play
    loss, _ = grpo_loss(logp, old, None, adv, torch.ones(6, 2), kl_coef=0.0)
    loss.backward()
    assert not torch.isnan(loss) and not torch.isnan(logp.grad).any()
    assert logp.grad[:3].abs().max().item() == 0.0
    assert logp.grad[3:].abs().max().item() > 0.0


def test_empty_answer_contributes_nothing_and_no_nan():
    logp, old, ref = hand_inputs()
    logp3 = torch.cat([LOGP, torch.tensor([[-4.0, -5.0, -6.0]])]).requires_grad_(True)
    old3 = torch.cat([old, torch.tensor([[-1.0, -1.0, -1.0]])])
    ref3 = torch.cat([ref, torch.tensor([[-2.0, -2.0, -2.0]])])
    mask3 = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    adv3 = torch.tensor([1.0, -1.0, 5.0])
    loss, stats = grpo_loss(logp3, old3, ref3, adv3, mask3, kl_coef=0.0, agg="seq-mean")
    loss.backward()
    assert loss.item() == pytest.approx((-0.85 + 1.1) / 3, abs=1e-6)  # empty answer counts as an answer of loss 0
    assert logp3.grad[2].tolist() == [0.0, 0.0, 0.0]
    assert not torch.isnan(logp3.grad).any()
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # stats only over the 5 real tokens
    all_empty, stats_empty = grpo_loss(logp3, old3, ref3, adv3, torch.zeros(3, 3), kl_coef=0.04)
    assert all_empty.item() == 0.0 and not math.isnan(stats_empty["kl"])


def test_grpo_loss_bad_input():
    logp, old, ref = hand_inputs()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, ADV, MASK, kl_coef=0.04)
    with pytest.raises(ValueError, match="'sum'"):
        grpo_loss(logp, old, ref, ADV, MASK, agg="sum")
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, ref, ADV, MASK[:, :2])
