"""The oracles: ablations that read the ground truth, to bound and to calibrate the label-free methods.

  "oracle"        `--reward oracle`: exact match against the ground truth, the supervised upper bound (the label
                  logged is still the --pseudo-label one, so its hit rate stays comparable).
  "noisy-oracle"  `--reward noisy-oracle --label-accuracy p`: HSR against a label that is the truth with
                  probability p and otherwise the group's most frequent wrong answer; the sweep over p finds the
                  break-even accuracy a pseudo label needs (docs/results.md).

Neither is a method: they read labels Med-Evo never sees. They are the only rules that do, so the training
loop hands them the questions WITH their answers (reads_labels); every other rule sees them with answer None.
The interfaces (rules/__init__.py): REWARDS fn(run, batch, labels) -> [B*G]; LABELERS fn(run, batch) ->
centroid.PseudoLabels.
"""

from collections import Counter

import torch

import centroid
import reward
from reward import normalize_answer

KINDS = ("oracle", "noisy-oracle")


def rewards(run, batch, labels):
    """REWARDS["oracle"]: 1 for a trained answer equal to its question's true answer, else 0 [B*G]."""
    truths = [r["answer"] for r in batch.records]
    return reward.exact_rewards(batch.trained.texts, centroid.label_of_each_answer(truths, batch.group_size))


def noisy_labels(run, batch):
    """LABELERS["noisy-oracle"]: per question the truth with probability --label-accuracy, else the group's most
    frequent wrong answer; the draws come from this rank's sampler RNG."""
    truths = [r["answer"] for r in batch.records]
    draws = torch.rand(len(truths), generator=run.generator, device=run.generator.device).tolist()
    labels = noisy_oracle_labels(batch.texts, batch.label_samples, truths, run.args.label_accuracy, draws)
    return centroid.from_texts(batch.emb, batch.texts, batch.label_samples, labels)


def noisy_oracle_labels(texts, group_size, truths, accuracy, draws):
    """Per group: the truth when its draw < accuracy, else the group's most frequent wrong answer.

    This is an ablation that reads labels (`--reward noisy-oracle --label-accuracy p`), never a method. A
    wrong answer is one that does not match the truth exactly (normalised): the oracle reward's notion.
    The wrong label is what a real pseudo label would be when it errs: the group's most frequent wrong
    answer (first occurrence on ties). A group with no wrong answer keeps the truth (a label chosen from
    its answers could not be wrong either), so the measured label accuracy is at least p; train.py logs it.
    texts: B*G answers; truths, draws (uniform in [0, 1)): one per group. Returns B label texts.
    """
    centroid.check_groups(len(texts), group_size, "noisy_oracle_labels")
    labels = []
    for g, (truth, draw) in enumerate(zip(truths, draws)):
        group = texts[g * group_size:(g + 1) * group_size]
        wrong = [t for t in group if normalize_answer(t) != normalize_answer(truth)]
        if draw < accuracy or not wrong:
            labels.append(truth)
            continue
        counts = Counter(normalize_answer(t) for t in wrong)
        top = max(counts.values())
        labels.append(next(t for t in wrong if counts[normalize_answer(t)] == top))
    return labels



# ----------------------------------------------------------------------------------------------
# Flags and checks


def add_flags(group):
    group.add_argument("--label-accuracy", type=float, default=1.0,
                       help="--reward noisy-oracle: probability that a question's label is the truth (else the "
                            "group's most frequent wrong answer)")


RANGES = [("label_accuracy", lambda v: 0 <= v <= 1, "in [0, 1]")]


def reads_labels(args):
    return args.reward in KINDS


def check_data(args, records, source):
    """An oracle needs every answer of the split."""
    if reads_labels(args) and any(r["answer"] is None for r in records):
        raise SystemExit(f"--reward {args.reward} reads the answers, but {source} has unlabelled questions: use a "
                         f"label-free reward (hsr, exact, f1)")
