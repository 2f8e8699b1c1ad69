"""Evaluation: score model answers on medical VQA (VQA-RAD, SLAKE, PathVQA) as the paper reports them.

Med-Evo (arXiv 2603.07443) reports, like LLaVA-Med, recall on OPEN questions and
accuracy on CLOSED questions. We follow LLaVA-Med's metrics with one fix.

LLaVA-Med's closed-question scoring appends a hit only when the prediction contains
"yes"/"no" as a substring AND the ground truth is in it; a yes/no prediction that is
wrong appends nothing, so wrong answers drop out of the denominator and accuracy is
inflated (the substring test also reads "no" inside "normal"). Here every CLOSED
question counts: a wrong, ambiguous or unparseable answer is simply wrong.

Rules (all on normalize_for_eval text: SQuAD normalisation + number words -> digits):

  OPEN     recall = share of the distinct ground-truth words found in the prediction's
           words (a ground truth with no words after normalisation: 1.0 if the
           prediction is also empty, else 0.0).
  CLOSED, ground truth yes/no:
           the prediction's polarity is its first word if that word is "yes" or "no"
           ("Yes, there is no lesion." -> yes); otherwise the polarity of the
           yes/no words anywhere in it, where "yes" means yes and "no"/"not" mean no
           ("There is no lesion" -> no, "The heart is not enlarged" -> no). A
           prediction with both polarities or neither is wrong.
  CLOSED, other ground truth (SLAKE has e.g. "Which is bigger, liver or heart?"):
           correct if the normalised prediction equals the ground truth or contains
           it as a whole-word phrase ("the liver is bigger" contains "liver").
           This is lenient: a prediction naming both options is counted correct.

  overall  mean over all labeled questions of the per-question score (recall for
           OPEN, 0/1 for CLOSED). Records whose answer is None are skipped and
           counted as n_unlabeled.

What a score is made of (reported beside it, not part of it):

  open_strict   exact match on OPEN questions: the share whose prediction equals the
                ground truth after normalize_for_eval (evaluate's own normalisation:
                reward.normalize_answer, then number words -> digits), so "The left
                lung." matches "Left Lung" but "the lesion is in the left lung" does
                not, though its open recall is 1.0.
  answer_words  mean length of the predictions in words (whitespace-separated, as
                generated), over all questions, labeled or not: a recall that rises
                with the answer's length is the verbosity open recall rewards.

Run it (greedy answers, then the table; per-question predictions go to a JSONL file):

    python evaluate.py --dataset synthetic --model models/tiny-base-seed1      # default: models/tiny-base-seed0
    python evaluate.py --dataset slake --data-root PATH --model Qwen/Qwen2.5-VL-3B-Instruct
"""

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

import centroid
import data
import model as modeling
import monitor
from scale import parallel
import reward
import rollout
from reward import normalize_answer

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SYNTHETIC_DIR = ARTIFACTS / "synthetic"  # the offline benchmark (tiny.SYNTHETIC_DIR), written by `python -m models.tiny`
TINY_BASE_DIR = ARTIFACTS.parent / "models" / "tiny-base-seed0"  # the shipped offline base model (tiny.py)

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
    "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
YES_WORDS = {"yes"}
NO_WORDS = {"no", "not"}


def normalize_for_eval(s):
    """SQuAD normalisation, then number words zero..twenty -> digits ("two" -> "2")."""
    return " ".join(NUMBER_WORDS.get(w, w) for w in normalize_answer(s).split())


def yes_no_polarity(pred):
    """'yes', 'no', or None (neither or both) for a free-text prediction; see the module docstring."""
    words = normalize_for_eval(pred).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    says_yes = any(w in YES_WORDS for w in words)
    says_no = any(w in NO_WORDS for w in words)
    if says_yes == says_no:
        return None
    return "yes" if says_yes else "no"


def closed_correct(pred, gt):
    """Is a CLOSED-question prediction right? (yes/no polarity, else exact match or whole-word containment)."""
    gt_norm = normalize_for_eval(gt)
    if gt_norm in ("yes", "no"):
        return yes_no_polarity(pred) == gt_norm
    pred_norm = normalize_for_eval(pred)
    if pred_norm == gt_norm:
        return True
    return gt_norm != "" and f" {gt_norm} " in f" {pred_norm} "


def open_recall(pred, gt):
    """Share of the distinct ground-truth words that appear in the prediction."""
    gt_words = set(normalize_for_eval(gt).split())
    pred_words = set(normalize_for_eval(pred).split())
    if not gt_words:
        return float(not pred_words)
    return len(gt_words & pred_words) / len(gt_words)


def open_strict(pred, gt):
    """1.0 if the prediction equals the ground truth after normalize_for_eval, else 0.0."""
    return float(normalize_for_eval(pred) == normalize_for_eval(gt))


def answer_words(pred):
    """The prediction's length in words (whitespace-separated, as generated)."""
    return len(pred.split())


def answer_text(answer, index):
    """Ground-truth answer as a string (some VQA-RAD answers are stored as numbers)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    raise TypeError(f"score_predictions: record {index} has an answer of type {type(answer).__name__}: {answer!r}")


def question_score(pred, gt, answer_type, index=None):
    """One question's score: open recall for OPEN, 1.0 / 0.0 for CLOSED."""
    answer_type = str(answer_type).strip().upper()
    if answer_type == "OPEN":
        return open_recall(pred, gt)
    if answer_type == "CLOSED":
        return float(closed_correct(pred, gt))
    where = f"record {index}" if index is not None else "question_score"
    raise ValueError(f"{where} has answer_type {answer_type!r}, expected 'OPEN' or 'CLOSED'")


def score_predictions(records, preds):
    """Score predictions against records (dicts with 'answer' and 'answer_type' OPEN/CLOSED).

    Returns open_recall, closed_acc, overall (fractions in [0, 1], None when there is no
    question of that kind), n_open, n_closed, n_unlabeled, and what they are made of (module
    docstring): open_strict (a fraction, None without OPEN questions) and answer_words (words
    per prediction over all records, None without records).
    """
    if len(records) != len(preds):
        raise ValueError(f"score_predictions: {len(records)} records but {len(preds)} predictions")
    open_scores, strict_scores, closed_scores, n_unlabeled = [], [], [], 0
    for index, (record, pred) in enumerate(zip(records, preds)):
        if not isinstance(pred, str):
            raise TypeError(f"score_predictions: prediction {index} is not a str: {pred!r}")
        if record["answer"] is None:
            n_unlabeled += 1
            continue
        gt = answer_text(record["answer"], index)
        score = question_score(pred, gt, record["answer_type"], index)
        if str(record["answer_type"]).strip().upper() == "OPEN":
            open_scores.append(score)
            strict_scores.append(open_strict(pred, gt))
        else:
            closed_scores.append(score)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "open_recall": mean(open_scores),
        "closed_acc": mean(closed_scores),
        "overall": mean(open_scores + closed_scores),
        "n_open": len(open_scores),
        "n_closed": len(closed_scores),
        "n_unlabeled": n_unlabeled,
        "open_strict": mean(strict_scores),
        "answer_words": mean([answer_words(p) for p in preds]),
    }


def fully_right(preds, records, answers):
    """[B] bool: does the metric score each prediction fully right against `answers`? None if any is missing."""
    if any(answer is None for answer in answers):
        return None
    return [question_score(p, answer_text(a, i), r["answer_type"]) == 1.0
            for i, (p, a, r) in enumerate(zip(preds, answers, records))]


def right_by_qid(records, preds):
    """{qid: does the metric score the prediction fully right?} (None for a record without an answer)."""
    return {r["qid"]: None if r["answer"] is None else question_score(p, answer_text(r["answer"], i), r["answer_type"])
            == 1.0 for i, (r, p) in enumerate(zip(records, preds))}


def answer_statistics(records, preds):
    """Label-free statistics of a split's answers: the collapse monitor of self-labelled RL.

    closed_top_share  share of the CLOSED questions given their single most frequent answer (1.0: one
                      answer to every yes/no question); answer_type is a property of the question, not its answer
    answer_entropy    entropy (nats) of the distribution of answers over all questions
    same_question_top_share
                      over the questions whose exact text is asked of two or more images: the share given
                      the most frequent answer to their text (1.0: every image asked "Which modality is
                      used?" gets the same answer). Logged only; not part of --stop-on-collapse's rule.
    Answers are compared after normalize_for_eval; None where there is no question of that kind.
    """
    answers = [normalize_for_eval(p) for p in preds]
    closed = [a for a, r in zip(answers, records) if str(r["answer_type"]).strip().upper() == "CLOSED"]
    counts = Counter(answers)
    entropy = -sum(c / len(answers) * math.log(c / len(answers)) for c in counts.values()) if answers else None
    by_question = {}  # question text -> Counter of its answers
    for answer, record in zip(answers, records):
        by_question.setdefault(record["question"], Counter())[answer] += 1
    repeated = [c for c in by_question.values() if c.total() >= 2]
    same_question = (sum(max(c.values()) for c in repeated) / sum(c.total() for c in repeated)) if repeated else None
    return {"closed_top_share": max(Counter(closed).values()) / len(closed) if closed else None,
            "answer_entropy": entropy, "same_question_top_share": same_question}


def before_after(before, after):
    """One line: the scores before and after training (percent), and the answers' length in words. A score
    missing on either side (None, or an older run's evaluation row without it) is left out."""
    keys = [("overall", "overall", 100), ("open_recall", "open recall", 100), ("open_strict", "open strict", 100),
            ("closed_acc", "closed accuracy", 100), ("answer_words", "answer words", 1)]
    return "before -> after: " + ", ".join(f"{name} {scale * before[key]:.2f} -> {scale * after[key]:.2f}"
                                          for key, name, scale in keys
                                          if before.get(key) is not None and after.get(key) is not None)


def format_table(scores):
    """Fixed-width text table of score_predictions() output, metrics in percent (answer words: words)."""
    def percent(x):
        return "-" if x is None else f"{100 * x:.2f}"

    words = scores.get("answer_words")
    rows = [
        ("open recall (%)", percent(scores["open_recall"])),
        ("open strict (%)", percent(scores.get("open_strict"))),
        ("closed accuracy (%)", percent(scores["closed_acc"])),
        ("overall (%)", percent(scores["overall"])),
        ("answer words", "-" if words is None else f"{words:.2f}"),
        ("n_open", str(scores["n_open"])),
        ("n_closed", str(scores["n_closed"])),
        ("n_unlabeled", str(scores.get("n_unlabeled", 0))),
    ]
    lines = [f"{'metric':<22}{'value':>10}", "-" * 32]
    lines += [f"{name:<22}{value:>10}" for name, value in rows]
    return "\n".join(lines)


# --- CLI ---


def predict(model, tokenizer, image_processor, records, batch_size=32, prompt_suffix=None, max_new_tokens=16,
            device=None):
    """Greedy answers for records, in order."""
    suffix = rollout.DEFAULT_PROMPT_SUFFIX if prompt_suffix is None else prompt_suffix
    return rollout.generate_answers(model, tokenizer, image_processor, records, batch_size=batch_size,
                                    prompt_suffix=suffix, max_new_tokens=max_new_tokens, temperature=0.0,
                                    device=device)


def write_predictions(path, records, preds):
    """One JSON line per question: qid, question, answer_type, ground truth, prediction, score."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for index, (r, p) in enumerate(zip(records, preds)):
            score = (None if r["answer"] is None
                     else question_score(p, answer_text(r["answer"], index), r["answer_type"]))
            f.write(json.dumps({"qid": r["qid"], "question": r["question"], "answer_type": r["answer_type"],
                                "answer": r["answer"], "prediction": p, "score": score}) + "\n")
    tmp.replace(path)


@torch.no_grad()
def evaluate_split(policy, tokenizer, image_processor, labelled, args, rank, world_size, tag, out_dir, device=None):
    """train.py's evaluation: greedy answers on the whole split, sharded over ranks, on the compute weights.

    Returns the scores and label-free statistics (image sensitivity too) and {qid: answer fully right}."""
    ranks_share = labelled[rank::world_size]
    options = dict(batch_size=args.eval_batch_size, prompt_suffix=args.prompt_suffix,
                   max_new_tokens=args.max_new_tokens, device=device)
    policy.eval()  # the KV cache is off in train mode under gradient checkpointing
    with parallel.gathered(policy, parallel.DTYPES[args.dtype]):
        preds = predict(policy, tokenizer, image_processor, ranks_share, **options)
        grey = (monitor.grey_answers(policy, tokenizer, image_processor, ranks_share, **options)
                if args.image_sensitivity else preds)
    by_qid = dict(parallel.gather_lists([(r["qid"], pair) for r, pair in zip(ranks_share, zip(preds, grey))]))
    preds, grey = ([by_qid[r["qid"]][i] for r in labelled] for i in (0, 1))
    scores = dict(score_predictions(labelled, preds), **answer_statistics(labelled, preds),
                  image_sensitivity=monitor.image_sensitivity(preds, grey) if args.image_sensitivity else None)
    if rank == 0:
        write_predictions(out_dir / f"predictions_{tag}.jsonl", labelled, preds)
    return scores, right_by_qid(labelled, preds)


def pseudo_label_accuracy(model, tokenizer, image_processor, records, group_size=8, temperature=1.0,
                          max_new_tokens=16, batch_size=8, seed=0):
    """Score of the majority answer and of the FPL answer among G samples per question (no training)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    majority, fpl = [], []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompt = rollout.build_inputs(tokenizer, image_processor, batch, device=model.device)
        out = rollout.sample(model, tokenizer, prompt, group_size, max_new_tokens, temperature, 1.0, generator)
        _, hidden = rollout.completion_logits_and_hidden(model, prompt, out.completion_ids, out.completion_mask,
                                                         group_size)
        emb = centroid.answer_embeddings(hidden, out.completion_mask)
        labels = centroid.fpl_pseudo_labels(emb, group_size).tolist()
        votes = centroid.majority_vote(out.texts, group_size)
        majority += [out.texts[g * group_size + i] for g, i in enumerate(votes)]
        fpl += [out.texts[g * group_size + i] for g, i in enumerate(labels)]
    return score_predictions(records, majority), score_predictions(records, fpl)


@torch.no_grad()
def premise_check(model, tokenizer, image_processor, records, samples=8, temperature=1.0, batch_size=32,
                  sample_batch_size=8, prompt_suffix=rollout.DEFAULT_PROMPT_SUFFIX, max_new_tokens=16, seed=0):
    """Will label-free adaptation help this model here? Everything measured on a *labelled* split, no training.

    greedy: the greedy score; single_sample: the mean score of single answers sampled at `temperature`;
    majority / fpl: the score of the pseudo label among `samples` answers, and where the gradient would flow
    (contested questions: the rewards of TTRL = majority + exact, or Med-Evo = FPL + HSR, are not all equal)
    how often the label and the greedy answer are fully right, and the reward accuracy (monitor.py);
    image_sensitivity: share of greedy answers that change when the image is greyed out.
    """
    options = dict(batch_size=batch_size, prompt_suffix=prompt_suffix, max_new_tokens=max_new_tokens)
    greedy = predict(model, tokenizer, image_processor, records, **options)
    grey = monitor.grey_answers(model, tokenizer, image_processor, records, **options)
    truths = [answer_text(r["answer"], i) for i, r in enumerate(records)]
    greedy_right = list(right_by_qid(records, greedy).values())
    generator = torch.Generator(device=model.device).manual_seed(seed)
    single, found = [], {kind: {"labels": [], "contested": [], "agree": []} for kind in centroid.PSEUDO_LABELS}
    for start in range(0, len(records), sample_batch_size):
        batch, batch_truths = records[start:start + sample_batch_size], truths[start:start + sample_batch_size]
        prompt = rollout.build_inputs(tokenizer, image_processor, batch, prompt_suffix, model.device)
        out = rollout.sample(model, tokenizer, prompt, samples, max_new_tokens, temperature, 1.0, generator)
        _, hidden = rollout.completion_logits_and_hidden(model, prompt, out.completion_ids, out.completion_mask,
                                                         samples)
        emb = centroid.answer_embeddings(hidden, out.completion_mask)  # [B*N, D]
        single += [question_score(t, batch_truths[i // samples], batch[i // samples]["answer_type"])
                   for i, t in enumerate(out.texts)]
        for kind in ("majority", "fpl"):  # TTRL (exact match), Med-Evo (HSR)
            chosen = centroid.majority(emb, out.texts, samples) if kind == "majority" else centroid.fpl(
                emb, out.texts, samples)
            label_texts, targets = chosen.texts, centroid.label_of_each_answer(chosen.texts, samples)
            rewards = (reward.exact_rewards(out.texts, targets) if kind == "majority"
                       else reward.hsr_rewards(out.texts, targets, chosen.cos))
            found[kind]["labels"] += label_texts
            found[kind]["contested"] += monitor.contested_groups(rewards, samples).tolist()
            found[kind]["agree"] += monitor.reward_agreement(out.texts, samples, label_texts, batch_truths)
    numbers = {"n_questions": len(records), "samples": samples, "temperature": temperature,
               "greedy": score_predictions(records, greedy)["overall"], "single_sample": sum(single) / len(single),
               "image_sensitivity": monitor.image_sensitivity(greedy, grey)}
    for kind, f in found.items():
        label_right = list(right_by_qid(records, f["labels"]).values())
        contested = [i for i, c in enumerate(f["contested"]) if c]

        def share(flags):
            return sum(flags[i] for i in contested) / len(contested) if contested else None

        numbers[kind] = {"score": score_predictions(records, f["labels"])["overall"],
                         "contested_questions": len(contested), "contested_share": len(contested) / len(records),
                         "contested_label_right": share(label_right), "contested_greedy_right": share(greedy_right),
                         "reward_accuracy": sum(f["agree"]) / len(f["agree"])}
    return numbers


def percent_scores(scores):
    """{"overall", "open_recall", "closed_acc"} of score_predictions() output, in percent (2 decimals)."""
    return {key: None if scores[key] is None else round(100 * scores[key], 2)
            for key in ("overall", "open_recall", "closed_acc")}


def report_base_model(model_dir, data_root, samples=8, seed=0, splits=("validate", "test")):
    """The base model before any adaptation: greedy on the source `validate` split; greedy, majority and
    FPL of `samples` answers at T = 1 on the target split (splits[1]). Scores in percent."""
    model, tokenizer, image_processor = modeling.load(model_dir, device="cpu")
    source = data.load_split("synthetic", data_root, splits[0])
    target = data.load_split("synthetic", data_root, splits[1])
    greedy = {split: score_predictions(records, predict(model, tokenizer, image_processor, records))
              for split, records in (("source", source), ("target", target))}
    report = {"source_validate": {"greedy": greedy["source"]}, "target_test": {"greedy": greedy["target"]}}
    majority, fpl = pseudo_label_accuracy(model, tokenizer, image_processor, target, group_size=samples, seed=seed)
    report["target_test"].update(majority=majority, fpl=fpl)
    for domain, entries in report.items():
        for name, scores in entries.items():
            print(f"{model_dir} on synthetic {domain}, {name}\n{format_table(scores)}")
            entries[name] = percent_scores(scores)
    report["n_questions"] = {"source_validate": len(source), "target_test": len(target)}
    report["samples"], report["temperature"] = samples, 1.0
    return report


def main(argv=None):
    modeling.disable_cudnn_attention()  # on CUDA: cuDNN SDPA's backward gives NaN gradients with our masks
    parser = argparse.ArgumentParser(
        description="Greedy answers on a split, scored with open recall and closed accuracy; with --premise, "
                    "the premise check: will label-free adaptation help this model? (docs/premise_check.md)")
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "slake", "vqa_rad", "path_vqa"])
    parser.add_argument("--data-root", default=None,
                        help="dataset folder (default: datasets/<dataset> in the repo; for synthetic: "
                             "artifacts/synthetic)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--lang", default="en", help="SLAKE language subset: en or all")
    parser.add_argument("--model", default=str(TINY_BASE_DIR),
                        help="hub name or folder (default: the shipped offline tiny base model, warm-start seed 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompt-suffix", default=rollout.DEFAULT_PROMPT_SUFFIX)
    parser.add_argument("--out", default=None, help="predictions JSONL (default: predictions_<dataset>_<split>.jsonl)")
    parser.add_argument("--premise", action="store_true",
                        help="the premise check on a labelled split: will label-free adaptation help this model? "
                             "(writes --out as JSON, default premise_<dataset>_<split>.json)")
    parser.add_argument("--samples", type=int, default=8, help="--premise: answers sampled per question (N)")
    parser.add_argument("--temperature", type=float, default=1.0, help="--premise: sampling temperature")
    parser.add_argument("--sample-batch-size", type=int, default=8, help="--premise: questions per sampling batch")
    parser.add_argument("--seed", type=int, default=0, help="--premise: sampling seed")
    modeling.add_pixel_flags(parser)
    args = parser.parse_args(argv)
    modeling.check_pixel_flags(args.max_pixels, args.min_pixels)
    root = data.resolve_root(args.dataset, args.data_root, ARTIFACTS.parent / "datasets", SYNTHETIC_DIR)
    for flag, value, least in [("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--samples", args.samples, 2), ("--sample-batch-size", args.sample_batch_size, 1)]:
        if value < least:
            raise SystemExit(f"{flag} {value}: must be an integer >= {least}")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature {args.temperature}: must be > 0 (the premise check samples)")
    try:
        records = data.load_split(args.dataset, root, args.split, lang=args.lang)
        data.check_images_open(records, f"{args.dataset}/{args.split}")  # before the model loads
    except (OSError, ValueError) as err:
        raise SystemExit(str(err)) from err
    model, tokenizer, image_processor = modeling.load(args.model)
    print(modeling.apply_pixel_flags(image_processor, args.max_pixels, args.min_pixels, records))
    if args.premise:
        return run_premise(args, model, tokenizer, image_processor, records)
    preds = predict(model, tokenizer, image_processor, records, args.batch_size, args.prompt_suffix,
                    args.max_new_tokens)
    print(format_table(score_predictions(records, preds)))
    out = args.out or f"predictions_{args.dataset}_{args.split}.jsonl"
    write_predictions(out, records, preds)
    print(f"wrote {out}")


def run_premise(args, model, tokenizer, image_processor, records):
    """evaluate.py --premise: the numbers as a table and a JSON, then the plain verdict."""
    if any(r["answer"] is None for r in records):
        raise SystemExit(f"--premise needs a labelled split: {args.dataset}/{args.split} has unlabelled questions")
    numbers = premise_check(model, tokenizer, image_processor, records, args.samples, args.temperature,
                            args.batch_size, args.sample_batch_size, args.prompt_suffix, args.max_new_tokens, args.seed)
    numbers["verdict"] = monitor.premise_verdict(numbers)
    numbers.update(model=str(args.model), dataset=args.dataset, split=args.split)
    out = Path(args.out or f"premise_{args.dataset}_{args.split}.json")
    out.write_text(json.dumps(numbers, indent=1))
    print(monitor.format_premise(numbers) + "\n\n" + numbers["verdict"] + f"\n\nwrote {out}")
    return numbers


if __name__ == "__main__":
    main()
