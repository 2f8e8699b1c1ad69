"""The monitor: label quality where the gradient flows, image sensitivity, and the collapse rules.

Self-labelled GRPO (TTRL, Med-Evo) learns only from *contested* groups: a group whose G rewards are all
equal gets zero advantage (grpo.group_advantages), so the questions that move the policy are exactly the
ones where its answers disagree, where it is unsure and its pseudo label is least reliable. The hit rate
over all questions overstates the signal; these numbers measure it where it flows. They read labels, so
they are diagnostics (like the hit rate), `nan` (logged as null) on an unlabelled split:

    contested_share        share of groups whose G rewards are not all equal
    contested_hit_rate     share of contested groups whose pseudo label the benchmark scores fully right
    contested_greedy_rate  on the same questions, share whose greedy answer was fully right *at the last
                           evaluation* (train.py keeps each evaluation's per-question verdicts; no extra pass)
    reward_accuracy        TTRL's "reward accuracy": share of trained answers whose exact-match reward
                           against the pseudo label equals their exact-match reward against the truth
                           (a wrong label can still give the right 0 to a wrong answer: TTRL's "lucky hit")
    flips                  per evaluation, questions right -> wrong and wrong -> right since the previous one

One number needs no label, and so is part of the collapse monitor a user of truly unlabelled data can watch:

    image_sensitivity      share of questions whose greedy answer changes when the image is replaced by a
                           uniform grey image of the same size ("Beyond Accuracy", arXiv 2603.03437, uses a
                           blank-image control). A model that has stopped looking at the image scores 0.

collapse_reason() is --stop-on-collapse's rule (relative to the evaluation before training), and
premise_verdict() the one plain sentence of `evaluate.py --premise`, built only from its numbers.
This file sits below evaluate.py and train.py in the import stack: whatever needs the benchmark's metric
(evaluate.question_score) is computed by the caller and handed in as booleans.
"""

import json
import math
from pathlib import Path

from PIL import Image

from scale import checkpoint
import reward
import rollout

GREY = (128, 128, 128)
TIE = 0.02  # the premise verdict calls label and greedy answer level when they are right within 2 points


# ----------------------------------------------------------------------------------------------
# Label quality where the gradient flows


def contested_groups(rewards, group_size):
    """[B] bool: the groups whose G rewards are not all equal (rewards [B*G]); only these get advantages."""
    r = rewards.detach().view(-1, group_size)  # [B, G]
    return (r != r[:, :1]).any(dim=1)


def reward_agreement(texts, group_size, label_texts, truths):
    """Per trained answer [B*G]: does its exact-match reward vs the pseudo label equal the one vs the truth?"""
    return [reward.exact_match(t, label_texts[i // group_size]) == reward.exact_match(t, truths[i // group_size])
            for i, t in enumerate(texts)]


COUNTS = ("groups", "contested", "contested_hit", "contested_greedy", "answers", "reward_agree")


def label_quality_counts(rewards, group_size, texts, label_texts, truths, label_right, greedy_right):
    """Counts (so that ranks can be summed) behind the label-quality rates of one step.

    rewards [B*G] and texts: the trained answers; label_texts, truths [B]; label_right [B] bool (pseudo label
    fully right), greedy_right [B] bool or None (greedy answer fully right at the last evaluation).
    Returns floats; those that need answers are nan when the split has none (the contested share needs none).
    """
    contested = contested_groups(rewards, group_size).tolist()
    label_free = {"groups": float(len(contested)), "contested": float(sum(contested))}
    if any(t is None for t in truths):
        return dict(label_free, **dict.fromkeys(COUNTS[2:], math.nan))
    greedy = [math.nan if g is None else float(g) for g in greedy_right]
    return {
        **label_free,
        "contested_hit": float(sum(h for h, c in zip(label_right, contested) if c)),
        "contested_greedy": float(sum(g for g, c in zip(greedy, contested) if c)),
        "answers": float(len(texts)),
        "reward_agree": float(sum(reward_agreement(texts, group_size, label_texts, truths))),
    }


def label_quality(stats):
    """A step's stats with the (rank-averaged) counts replaced by their rates: contested_share,
    contested_hit_rate, contested_greedy_rate, reward_accuracy; nan where there is nothing to divide."""
    def ratio(a, b):
        return stats[a] / stats[b] if stats[b] > 0 else math.nan

    rates = {"contested_share": ratio("contested", "groups"), "contested_hit_rate": ratio("contested_hit", "contested"),
             "contested_greedy_rate": ratio("contested_greedy", "contested"),
             "reward_accuracy": ratio("reward_agree", "answers")}
    return dict({k: v for k, v in stats.items() if k not in COUNTS}, **rates)


def last_verdicts(out_dir):
    """{qid: right} of the newest evaluation logged in out_dir (a resumed run continues from it); None if none."""
    evals = [r for r in checkpoint.read_rows(Path(out_dir) / "metrics.jsonl") if "eval" in r]
    if not evals:
        return None
    lines = (Path(out_dir) / f"predictions_{evals[-1]['eval']}.jsonl").read_text().splitlines()
    return {p["qid"]: None if p["score"] is None else p["score"] == 1.0 for p in map(json.loads, lines)}


def flips(previous, current):
    """Questions right -> wrong and wrong -> right between two evaluations ({qid: right} each; None = unlabelled)."""
    shared = [q for q in current if q in previous and current[q] is not None and previous[q] is not None]
    return {"flips_right_to_wrong": sum(previous[q] and not current[q] for q in shared),
            "flips_wrong_to_right": sum(current[q] and not previous[q] for q in shared)}


# ----------------------------------------------------------------------------------------------
# Image sensitivity (label-free)


def grey_records(records):
    """The same questions, each image replaced by a uniform grey RGB image of the same size."""
    def grey(path):
        with Image.open(path) as image:
            return Image.new("RGB", image.size, GREY)

    return [dict(r, image=grey(r["image"])) for r in records]


def grey_answers(model, tokenizer, image_processor, records, batch_size, prompt_suffix, max_new_tokens, device=None):
    """Greedy answers to every question with its image greyed out, in order."""
    return rollout.generate_answers(model, tokenizer, image_processor, grey_records(records), batch_size=batch_size,
                                    prompt_suffix=prompt_suffix, max_new_tokens=max_new_tokens, temperature=0.0,
                                    device=device)


def image_sensitivity(preds, grey_preds):
    """Share of questions whose (normalised) greedy answer changes without the image; None for no questions."""
    if len(preds) != len(grey_preds):
        raise ValueError(f"image_sensitivity: {len(preds)} answers but {len(grey_preds)} grey-image answers")
    changed = [reward.normalize_answer(a) != reward.normalize_answer(b) for a, b in zip(preds, grey_preds)]
    return sum(changed) / len(changed) if changed else None


# ----------------------------------------------------------------------------------------------
# The collapse rules (label-free) and the monitor line


def collapse_reason(scores, baseline, args):
    """Why an evaluation looks collapsed, from the answers alone (no labels); None if it looks healthy.

    Collapse is the known failure of self-labelled RL: GRPO sharpens the pseudo labels' noise until the
    policy gives one answer to everything. Signs, each relative to the evaluation before training:
      * the most frequent answer covers >= --collapse-closed-share of the CLOSED questions (and did not
        before training: a split whose yes/no answers are that one-sided cannot show this sign);
      * the entropy of all answers fell below --collapse-entropy-ratio x its value before training;
      * (--collapse-image-ratio > 0) the image sensitivity fell below that fraction of its value before.
    """
    share, base_share = scores["closed_top_share"], baseline["closed_top_share"]
    if share is not None and share >= args.collapse_closed_share > base_share:
        return f"one answer to {100 * share:.1f}% of the CLOSED questions (before training: {100 * base_share:.1f}%)"
    entropy, base_entropy = scores["answer_entropy"], baseline["answer_entropy"]
    if entropy is not None and entropy < args.collapse_entropy_ratio * base_entropy:
        return f"answer entropy {entropy:.3f} nats, below {args.collapse_entropy_ratio:g} x {base_entropy:.3f} before"
    sensitivity, base_sensitivity = scores.get("image_sensitivity"), baseline.get("image_sensitivity")
    ratio = getattr(args, "collapse_image_ratio", 0.0)
    if ratio > 0 and sensitivity is not None and base_sensitivity and sensitivity < ratio * base_sensitivity:
        return (f"image sensitivity {100 * sensitivity:.1f}%, below {ratio:g} x {100 * base_sensitivity:.1f}% "
                f"before: the answers stop depending on the image")
    return None


def percent(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_monitor(scores):
    """The evaluation's label-free line (and, when the split has answers, its flips)."""
    line = (f"collapse monitor: top CLOSED answer share {percent(scores['closed_top_share'])}, "
            f"answer entropy {scores['answer_entropy']:.3f} nats, "
            f"same-question top share {percent(scores['same_question_top_share'])}, "
            f"image sensitivity {percent(scores.get('image_sensitivity'))}")
    if scores.get("flips_right_to_wrong") is not None:
        line += f"\nflips since the last evaluation: right -> wrong {scores['flips_right_to_wrong']}, " \
                f"wrong -> right {scores['flips_wrong_to_right']}"
    return line


# ----------------------------------------------------------------------------------------------
# The premise check's verdict (evaluate.py --premise computes the numbers)


def format_eta(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def format_step(step, total_steps, stats, eta):
    """The line train.py prints after each step."""
    return (f"step {step}/{total_steps} | reward {stats['reward']:.3f} | hit {stats['hit_rate']:.2f} | "
            f"kl {stats['kl']:.4f} | clip {stats['clip_frac']:.3f} | len {stats['answer_length']:.1f} | "
            f"{stats['seconds_step']:.1f}s/step | ETA {format_eta(eta)}")


def premise_verdict(numbers):
    """One plain sentence per labeler from the premise check's numbers: where the gradient flows (contested
    questions), is the pseudo label right more often than the greedy answer it would move?"""
    lines = []
    for name, key in [("majority vote (TTRL)", "majority"), ("FPL (Med-Evo)", "fpl")]:
        q = numbers[key]
        if not q["contested_questions"]:
            lines.append(f"{name}: no contested question at this temperature: GRPO would get no signal.")
            continue
        hit, greedy = q["contested_label_right"], q["contested_greedy_right"]
        direction = ("the reward pushes toward better answers than the model's own: adaptation can help"
                     if hit > greedy + TIE else "the reward pushes toward worse answers than the model's own: "
                     "expect label-free adaptation to hurt" if hit < greedy - TIE
                     else f"the label is no better than the greedy answer (within {100 * TIE:.0f} points): expect "
                     "no gain, and a drift toward the model's own consensus")
        lines.append(f"{name}: on the {q['contested_questions']} contested questions "
                     f"({100 * q['contested_share']:.0f}% of all) the pseudo label is right {100 * hit:.1f}% of the "
                     f"time and the greedy answer {100 * greedy:.1f}%: {direction}.")
    return "\n".join(lines)


def format_premise(numbers):
    """The premise check as a short fixed-width table (percent)."""
    rows = [("greedy score", numbers["greedy"]), ("single sample at T, mean score", numbers["single_sample"]),
            (f"majority@{numbers['samples']} score", numbers["majority"]["score"]),
            (f"FPL@{numbers['samples']} score", numbers["fpl"]["score"]),
            ("image sensitivity", numbers["image_sensitivity"])]
    for key, name in [("majority", "TTRL (majority + exact)"), ("fpl", "Med-Evo (FPL + HSR)")]:
        q = numbers[key]
        rows += [(f"{name}: contested share", q["contested_share"]),
                 (f"{name}: label right, contested", q["contested_label_right"]),
                 (f"{name}: greedy right, contested", q["contested_greedy_right"]),
                 (f"{name}: reward accuracy", q["reward_accuracy"])]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{percent(value):>8}" for name, value in rows)
