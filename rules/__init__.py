"""The research rules of the field, behind one door: how a label is chosen, how an answer is rewarded and how
rewards become advantages. The paper's method is one entry of each table; every other entry is a rule from the
literature (or an ablation), in a file of its own with its flags and checks:

  low_consensus.py  RESTRAIN's penalty / EMPO's drop of groups whose label few answers share  (ADVANTAGES)
  ema_teacher.py    Co-rewarding-II: the label comes from an EMA copy of the policy            (LABELERS)
  novelty.py        EVOL-RL: agreement with the label plus novelty, replacing the reward       (REWARDS)
  entropy.py        RENT: minus the answer's token entropy, no label                           (REWARDS)
  oracle.py         the oracle and the noisy oracle: ablations that read the ground truth      (both)
  label_samples.py  TTRL's protocol: the label is chosen from N > G samples                    (the Batch)

Three plain name -> function tables, one signature each (a flag's choices are a table's names, so an unknown
name fails when the flags are parsed):
  LABELERS[name](run, batch)                 -> centroid.PseudoLabels   one label per question
  REWARDS[name](run, batch, labels)          -> float32 tensor [B*G]    one reward per trained answer
  ADVANTAGES[name](run, rewards, shares)     -> grpo.Advantages         shares: each label's vote share [B]
`run` is train.py's Run (args, models, tokenizer, sampler RNG); `batch` is a Batch below. To add a rule: one
function, one line in a table, its flags in add_flags (docs/extending.md).
"""

from dataclasses import dataclass

import torch

import centroid
import grpo
import reward
import rollout
from rules import ema_teacher, entropy, label_samples, low_consensus, novelty, oracle


@dataclass
class Batch:
    """One step's sampled answers, as the labelers and rewards see them (the hand-off from step 2 to 3-4)."""
    records: list  # [B] the questions (with their answers only when a rule reads labels: oracle.reads_labels)
    prompt: dict  # rollout.build_inputs' model inputs
    texts: list  # [B*N] every sampled answer, N per question
    emb: torch.Tensor  # [B*N, D] their embeddings (centroid.answer_embeddings of the policy's hidden states)
    trained: rollout.Rollout  # [B*G] the first G answers of each question: the ones GRPO trains on
    logits: torch.Tensor  # [B*G, T, V] the trained answers' logits under the sampling policy (fp32)
    group_size: int  # G
    label_samples: int  # N >= G
    timings: dict  # seconds per stage (parallel.timed), for a rule that times its own part

    def first_of_each_group(self, values):
        """[B*N] values -> [B*G]: those of the trained answers."""
        return values.view(-1, self.label_samples)[:, :self.group_size].reshape(-1)


# ----------------------------------------------------------------------------------------------
# The paper's entries (their math is in the stage files)


def fpl(run, batch):
    return centroid.fpl(batch.emb, batch.texts, batch.label_samples)


def majority(run, batch):
    return centroid.majority(batch.emb, batch.texts, batch.label_samples)


def hsr(run, batch, labels):
    targets = centroid.label_of_each_answer(labels.texts, batch.group_size)  # [B*G]
    return reward.hsr_rewards(batch.trained.texts, targets, batch.first_of_each_group(labels.cos),
                              run.args.soft_weight, run.args.f1_weight)


def exact(run, batch, labels):
    return reward.exact_rewards(batch.trained.texts, centroid.label_of_each_answer(labels.texts, batch.group_size))


def f1(run, batch, labels):
    return reward.f1_rewards(batch.trained.texts, centroid.label_of_each_answer(labels.texts, batch.group_size))


def group(run, rewards, shares):
    return grpo.Advantages(rewards, grpo.group_advantages(rewards, run.args.group_size, scale=run.args.adv_scale))


LABELERS = {"fpl": fpl, "majority": majority, "ema-teacher": ema_teacher.labels,
            "noisy-oracle": oracle.noisy_labels}
REWARDS = {"hsr": hsr, "exact": exact, "f1": f1, "oracle": oracle.rewards, "noisy-oracle": hsr,
           "entropy": entropy.rewards, "novelty": novelty.rewards}
ADVANTAGES = {"group": group, "penalize": low_consensus.penalize, "drop": low_consensus.drop}
PSEUDO_LABELS = centroid.PSEUDO_LABELS  # --pseudo-label: the labelers a user picks; the others come with a rule


# ----------------------------------------------------------------------------------------------
# Which entry the flags choose


def labeler(args):
    """The label: the EMA teacher's or the noisy oracle's when their rule is on, else --pseudo-label's."""
    name = "ema-teacher" if args.ema_teacher else "noisy-oracle" if args.reward == "noisy-oracle" else args.pseudo_label
    return LABELERS[name]


def rewarder(args):
    """--reward's, unless --novelty replaces it."""
    return REWARDS["novelty" if args.novelty else args.reward]


def advantager(args):
    """The plain group advantages, unless a low-consensus rule is on (--consensus-min > 0)."""
    return ADVANTAGES[low_consensus.advantage_rule(args) or "group"]


def reads_labels(args):
    """Does a chosen rule read the ground truth? (Then, and only then, the step sees the answers.)"""
    return oracle.reads_labels(args)


def after_step(run, step, total_steps):
    """What a rule does after each optimizer step: the EMA teacher's update."""
    if run.teacher is not None:
        ema_teacher.after_step(run, step, total_steps)


# ----------------------------------------------------------------------------------------------
# Flags and checks


RULES = (label_samples, oracle, low_consensus, novelty, ema_teacher, entropy)  # each may hold add_flags, RANGES,
#                                                                                check: a new rule with flags joins here


def add_flags(parser):
    """The rules' flags, in one --help section."""
    group = parser.add_argument_group("research rules (rules/; each off by default)")
    for rule in RULES:
        if hasattr(rule, "add_flags"):
            rule.add_flags(group)


RANGES = [entry for rule in RULES for entry in getattr(rule, "RANGES", [])]  # (flag, test, what it must be)


def check(args):
    """Each rule's own checks (the ranges are checked before, with the core's: harness/flags.py)."""
    for rule in RULES:
        if hasattr(rule, "check"):
            rule.check(args)


def check_tables():
    """Every flag value names a function: a half-registered name fails here, at import, not mid-run."""
    for table in (LABELERS, REWARDS, ADVANTAGES):
        for name, fn in table.items():
            if not callable(fn):
                raise TypeError(f"rules: {name!r} is registered to {fn!r}, not a function")
    missing = [name for name in (*PSEUDO_LABELS, *low_consensus.RULES) if name not in {**LABELERS, **ADVANTAGES}]
    if missing:
        raise TypeError(f"rules: flag values without a function: {missing}")


check_tables()
