"""The collapse-resistant rules of issue 18, each on hand-built groups with the numbers worked out by hand:
the low-consensus filter (RESTRAIN's penalty, EMPO's drop), the entropy reward (RENT), novelty shaping
(EVOL-RL), the EMA teacher (Co-rewarding-II); then short train.py runs on a tiny random model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from types import SimpleNamespace

import centroid
import grpo
import model as modeling
import rules
import train
from rules import ema_teacher, entropy, low_consensus, novelty

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Low-consensus filter

# Two groups of G = 4. Group 0: label "a" holds 2 of 4 votes (share 0.5); group 1: label "x" holds 1 of 4 (0.25).
TEXTS = ["a", "b", "c", "a", "x", "y", "z", "w"]
LABELS = ["a", "x"]
EXACT = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # exact match vs the labels


def rule_run(consensus_min, rule="penalize", delta=0.1):
    """The part of a Run an advantage rule reads: its flags."""
    args = SimpleNamespace(group_size=4, adv_scale="std", consensus_min=consensus_min, low_consensus=rule,
                           penalty_delta=delta)
    return SimpleNamespace(args=args)


def advantages_of(run, rewards, shares):
    adv = rules.advantager(run.args)(run, rewards, shares)
    return adv.rewards, adv.advantages, adv.keep


def test_label_shares_are_the_labels_vote_shares():
    assert centroid.label_shares(TEXTS, 4, LABELS) == [0.5, 0.25]
    assert centroid.label_shares(["Yes", "yes.", "no", "the yes"], 4, ["yes"]) == [0.75]  # normalised, as rewards


def test_penalize_zeroes_an_untrusted_groups_rewards_and_shifts_its_advantages_by_minus_delta():
    """kappa = 0.5: group 1 (share 0.25) is untrusted, group 0 (share 0.5, not below) is kept as it is."""
    rewards, advantages, keep = advantages_of(rule_run(0.5, "penalize"), EXACT, [0.5, 0.25])
    assert rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # group 0 unchanged: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1 / sqrt(3), eps 1e-4
    a = 0.5 / (3 ** -0.5 + 1e-4)
    assert advantages.tolist() == pytest.approx([a, -a, -a, a, -0.1, -0.1, -0.1, -0.1], abs=1e-6)
    assert keep is None  # every row is kept
    # kappa = 0 (the default): the ordinary GRPO advantages, nothing untrusted
    assert rules.advantager(rule_run(0.0).args) is rules.ADVANTAGES["group"]  # the plain function, by its name
    rewards0, advantages0, keep0 = advantages_of(rule_run(0.0), EXACT, [0.5, 0.25])
    assert torch.equal(rewards0, EXACT) and torch.equal(advantages0, grpo.group_advantages(EXACT, 4)) and keep0 is None
    assert low_consensus.penalize(rule_run(0.5), EXACT, [0.5, 0.25]).untrusted == 0.5


def logps(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(n, t, generator=g) - 0.1


@pytest.mark.parametrize("agg", grpo.LOSS_AGGS)
def test_a_dropped_group_gives_exactly_zero_gradient_and_the_rest_trains_as_if_it_were_absent(agg):
    rewards, advantages, keep = advantages_of(rule_run(0.5, "drop"), EXACT, [0.5, 0.25])
    assert keep.tolist() == [True] * 4 + [False] * 4 and torch.equal(rewards, EXACT)
    old, ref = logps(8, 3, 0), logps(8, 3, 1)  # ref != logp: the KL term alone would give a gradient
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 4 + [[1.0, 1.0, 1.0]] * 4)
    logp = (old + 0.05).requires_grad_()  # ratio != 1
    loss, _ = grpo.grpo_loss(logp, old, ref, advantages, mask, kl_coef=0.04, agg=agg, keep=keep)
    loss.backward()
    assert logp.grad[4:].abs().sum() == 0.0  # the dropped group: no gradient at all
    assert logp.grad[:4].abs().sum() > 0
    alone = (old[:4] + 0.05).requires_grad_()  # group 0 alone, as if group 1 had never been sampled
    loss_alone, _ = grpo.grpo_loss(alone, old[:4], ref[:4], advantages[:4], mask[:4], kl_coef=0.04, agg=agg)
    loss_alone.backward()
    assert torch.allclose(logp.grad[:4], alone.grad) and torch.allclose(loss, loss_alone)


# ----------------------------------------------------------------------------------------------
# Entropy reward (RENT)


def test_entropy_reward_is_minus_the_mean_token_entropy_over_the_answer_tokens():
    """Answer 0: token 0 logits [0, 0] -> p = (1/2, 1/2), H = ln 2; token 1 logits [ln 3, 0] -> p = (3/4, 1/4),
    H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335; token 2 is padding (its huge logits must not count).
    Reward -(0.693147 + 0.562335) / 2 = -0.627741. Answer 1: peaked tokens, H ~ 0; answer 2: no tokens -> 0."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [1e4, -1e4]],
                           [[50.0, 0.0], [0.0, 50.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    rewards = entropy.entropy_rewards(logits, mask)
    assert rewards[0].item() == pytest.approx(-0.627741, abs=1e-6)
    assert rewards[1].item() == pytest.approx(0.0, abs=1e-18) and rewards[1].item() <= 0
    assert rewards[2].item() == 0.0
    with pytest.raises(ValueError, match="entropy_rewards"):
        entropy.entropy_rewards(logits[0], mask)


# ----------------------------------------------------------------------------------------------
# Novelty shaping (EVOL-RL)


def test_novelty_rewards_hand_worked():
    """Group 0: "yes yes yes no", label "yes". Unit embeddings e0 = (1, 0, 0), e1 = (.6, .8, 0), e2 = (0, 1, 0),
    e3 = (.8, 0, .6): cosines s01 = .6, s02 = 0, s03 = .8, s12 = .8, s13 = .48, s23 = 0.
      novelty = 1 - (.5 * mean over the other majority answers + .5 * max over ALL other answers)
      n0 = 1 - (.5 * (.6 + 0) / 2 + .5 * .8) = .45   (the max .8 is to e3, outside the majority)
      n1 = 1 - (.5 * (.6 + .8) / 2 + .5 * .8) = .25
      n2 = 1 - (.5 * (0 + .8) / 2 + .5 * .8) = .40
    min-max over the majority: 1, 0, .75 -> rewards .5 + .5 x: 1.0, .5, .875; e3 alone in the rest: -.5.
    Group 1: "no CT CT MRI", label "CT". e0 = (1, 0, 0), e1 = (0, 1, 0), e2 = (0, .6, .8), e3 = (-.6, .8, 0):
    s01 = 0, s02 = 0, s03 = -.6 -> clipped to 0, s12 = .6, s13 = .8, s23 = .48.
      majority: n1 = 1 - (.5 * .6 + .5 * .8) = .3,  n2 = 1 - (.5 * .6 + .5 * .6) = .4  -> .5, 1.0
      the rest: n0 = 1 - (.5 * 0 + .5 * 0) = 1,     n3 = 1 - (.5 * 0 + .5 * .8) = .6  -> -.5, -1.0
    Group 2: four identical answers: equal novelty -> .75 each."""
    emb = torch.tensor([[1, 0, 0], [.6, .8, 0], [0, 1, 0], [.8, 0, .6],
                        [1, 0, 0], [0, 1, 0], [0, .6, .8], [-.6, .8, 0],
                        [2, 0, 0], [2, 0, 0], [2, 0, 0], [2, 0, 0]])  # norms need not be 1
    texts = ["yes", "yes", "Yes.", "no", "no", "CT", "CT", "MRI", "a", "a", "a", "a"]
    rewards = novelty.novelty_rewards(emb, texts, 4, ["yes", "CT", "a"])
    assert rewards.tolist() == pytest.approx([1.0, 0.5, 0.875, -0.5, -0.5, 0.5, 1.0, -1.0, 0.75, 0.75, 0.75, 0.75],
                                             abs=1e-6)


def test_a_lone_majority_answer_gets_1_and_equal_others_get_minus_three_quarters():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    rewards = novelty.novelty_rewards(emb, ["CT", "MRI", "X-Ray", "US"], 4, ["CT"])
    assert rewards.tolist() == pytest.approx([1.0, -0.75, -0.75, -0.75])


# ----------------------------------------------------------------------------------------------
# EMA teacher (Co-rewarding-II)


def test_ema_decay_follows_the_cosine_from_start_to_end():
    """K = 4 steps, 0.99 -> 0.9999: a(0) = 0.99, a(2) = (0.99 + 0.9999) / 2 = 0.99495, a(4) = 0.9999;
    a(1) = 0.9999 + 0.0099 * (1 + cos(pi / 4)) / 2 = 0.9999 - 0.0099 * 0.853553 = 0.991450."""
    assert ema_teacher.ema_decay(0, 4, 0.99, 0.9999) == pytest.approx(0.99, abs=1e-12)
    assert ema_teacher.ema_decay(1, 4, 0.99, 0.9999) == pytest.approx(0.991450, abs=1e-6)
    assert ema_teacher.ema_decay(2, 4, 0.99, 0.9999) == pytest.approx(0.99495, abs=1e-12)
    assert ema_teacher.ema_decay(4, 4, 0.99, 0.9999) == pytest.approx(0.9999, abs=1e-12)
    assert ema_teacher.ema_decay(9, 4, 0.99, 0.9999) == pytest.approx(0.9999, abs=1e-12)  # clipped to K


def test_ema_update_on_a_two_parameter_model():
    """teacher (w, b) = (0, 0), policy (1, 2). After a = 0.99: (0.01, 0.02); then after a = 0.99495 (the middle
    of the schedule): w = 0.99495 * 0.01 + 0.00505 * 1 = 0.0149995, b = 0.99495 * 0.02 + 0.00505 * 2 = 0.029999;
    then a = 0.9999: w = 0.9999 * 0.0149995 + 0.0001 * 1 = 0.01509800, b = 0.9999 * 0.029999 + 0.0002 = 0.03019600."""
    teacher, policy = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(0.0), teacher.bias.fill_(0.0), policy.weight.fill_(1.0), policy.bias.fill_(2.0)
    expected = [(0.01, 0.02), (0.0149995, 0.029999), (0.01509800, 0.03019600)]
    for step, (w, b) in zip([0, 2, 4], expected):
        ema_teacher.ema_update(teacher, policy, ema_teacher.ema_decay(step, 4, 0.99, 0.9999))
        assert teacher.weight.item() == pytest.approx(w, abs=1e-7) and teacher.bias.item() == pytest.approx(b, abs=1e-7)
    assert policy.weight.item() == 1.0 and policy.bias.item() == 2.0  # the policy is untouched


@pytest.mark.parametrize("processes", [1, 2])
def test_the_teacher_is_saved_and_restored(tiny_model_dir, unlabeled_slake_folder, tmp_path, processes):
    """--ema-end 0.5. Step 1 of 1: the saved teacher is a(1) * base + (1 - a(1)) * policy, a(K) = --ema-end.
    Then the saved teacher is replaced by itself + 0.5 and the run resumed for step 2 of 2: the teacher written
    then is 0.5 * (saved + 0.5) + 0.5 * policy, 0.25 away from both a teacher that did not move and one that
    restarted from the base, so the resumed run started from teacher.pt and made the update. With 2 processes
    under torchrun, teacher and policy are FSDP2-sharded: the update is shard by shard, teacher.pt gathered."""
    out = tmp_path / "run"
    args = [*FAST, "--model", str(tiny_model_dir), "--data-root", str(unlabeled_slake_folder), "--out-dir", str(out),
            "--pseudo-label", "majority", "--reward", "exact", "--ema-teacher", "--ema-start", "0.9", "--ema-end",
            "0.5"]
    run = train.main if processes == 1 else lambda argv: torchrun(processes, "train.py", *argv)
    run(args)
    names = [name for name, _ in modeling.load_model(tiny_model_dir, "cpu", torch.float32).named_parameters()]
    base = modeling.load_model(tiny_model_dir, "cpu", torch.float32).state_dict()
    policy = modeling.load_model(out / "checkpoint", "cpu", torch.float32).state_dict()
    saved = torch.load(out / "checkpoint" / "teacher.pt", weights_only=True)
    for k in names:
        assert torch.allclose(saved[k], 0.5 * base[k] + 0.5 * policy[k], atol=1e-6), k
    torch.save({k: v + 0.5 if v.is_floating_point() else v for k, v in saved.items()},  # tied aliases too
               out / "checkpoint" / "teacher.pt")
    run([*args, "--resume", "--max-steps", "2"])
    policy = modeling.load_model(out / "checkpoint", "cpu", torch.float32).state_dict()
    resumed = torch.load(out / "checkpoint" / "teacher.pt", weights_only=True)
    for k in names:
        assert torch.allclose(resumed[k], 0.5 * (saved[k] + 0.5) + 0.5 * policy[k], atol=1e-5), k


def torchrun(processes, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# End to end: short runs on a tiny random model


FAST = ["--dataset", "slake", "--questions-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
        "--max-steps", "1", "--eval-batch-size", "12", "--no-image-sensitivity"]


def test_the_rules_run_together(tiny_model_dir, unlabeled_slake_folder, tmp_path):
    """One short run with every rule that composes (a run here takes minutes, not seconds, so one run for all;
    each ablation row, --reward entropy's included, also runs in test_label_quality's label-free test)."""
    train.main([*FAST, "--model", str(tiny_model_dir), "--data-root", str(unlabeled_slake_folder),
                "--out-dir", str(tmp_path / "run"), "--pseudo-label", "fpl", "--reward", "hsr", "--label-samples", "3",
                "--consensus-min", "0.6", "--low-consensus", "drop", "--novelty", "--ema-teacher"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "eval" not in r)
    assert math.isfinite(step["reward"]) and math.isfinite(step["grad_norm"]) and step["seconds_teacher"] > 0
    assert step["untrusted"] in (0.0, 0.5, 1.0)  # 2 questions: each group's label share is 1/3, 2/3 or 1


def test_bad_values_of_the_new_flags_are_refused_by_name(tiny_model_dir, tmp_path):
    base = ["--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match="--consensus-min 1.5"):
        train.main([*base, "--consensus-min", "1.5"])
    with pytest.raises(SystemExit, match="--penalty-delta -0.1"):
        train.main([*base, "--penalty-delta", "-0.1"])
    with pytest.raises(SystemExit, match="--novelty"):
        train.main([*base, "--novelty", "--reward", "entropy"])
    with pytest.raises(SystemExit, match="--ema-end 1.5"):
        train.main([*base, "--ema-teacher", "--ema-end", "1.5"])
    with pytest.raises(SystemExit, match="--ema-teacher with --offload"):
        train.main([*base, "--ema-teacher", "--offload"])


# ----------------------------------------------------------------------------------------------
# The tables: a name is a function, or the flags refuse it


def test_every_reward_and_label_name_is_a_flag_choice_with_a_function():
    assert set(rules.PSEUDO_LABELS) <= set(rules.LABELERS)
    assert all(callable(fn) for table in (rules.LABELERS, rules.REWARDS, rules.ADVANTAGES) for fn in table.values())
    assert train.parse_args(["--reward", "novelty"]).reward == "novelty"
    with pytest.raises(SystemExit):  # argparse: invalid choice, before anything runs
        train.parse_args(["--reward", "bleu"])


def test_a_half_registered_name_is_refused(monkeypatch):
    monkeypatch.setitem(rules.REWARDS, "bleu", None)
    with pytest.raises(TypeError, match="'bleu' is registered to None"):
        rules.check_tables()


def test_the_fpl_teacher_runs_sharded_with_uneven_answers(tiny_model_dir, unlabeled_slake_folder, tmp_path):
    """--ema-teacher with its default FPL label, end to end under FSDP2 in 2 processes: the teacher's FPL pass
    runs as one registered FSDP forward (it used to fail with 'mixed torch.Tensor and DTensor'). Answers of
    uneven length across ranks: the next test."""
    out = tmp_path / "run"
    torchrun(2, "train.py", *FAST, "--model", str(tiny_model_dir), "--data-root", str(unlabeled_slake_folder),
             "--out-dir", str(out), "--ema-teacher", "--fsdp", "on", "--max-new-tokens", "8", "--max-steps", "2",
             "--temperature", "1.5")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert len(steps) == 2 and all(math.isfinite(r["reward"]) and r["seconds_teacher"] > 0 for r in steps)
    assert (out / "checkpoint" / "teacher.pt").is_file()


def test_a_sharded_teacher_samples_uneven_answers_without_collectives(tiny_model_dir, slake_folder, tmp_path):
    """Inside parallel.gathered the sharded teacher (root resharded after each forward) is gathered once; its
    rollout of 2 tokens on rank 0 and 6 on rank 1, and its FPL pass, then issue no all-gather at all."""
    out = tmp_path / "counts.json"
    torchrun(2, "tests/gathered_check.py", str(tiny_model_dir), str(slake_folder), str(out))
    (entry0, inside0, length0), (entry1, inside1, length1) = json.loads(out.read_text())
    assert (length0, length1) == (2, 6)  # uneven on purpose
    assert entry0 == entry1 == 5 and inside0 == inside1 == 0  # 2 layers + 2 vision blocks + the root, once
