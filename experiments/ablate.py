"""The miniature Med-Evo experiment: the ablation table, its spread over base models, and the evolution curve.

Each row adapts a tiny base model on the synthetic target `test` split (unlabeled) with one combination
of pseudo-labeler, reward and vote size, and reports the final greedy scores on that split:

    base              no adaptation (greedy answers of the warm-started model)
    TTRL              majority vote + exact-match reward
    FPL + exact       feature-driven pseudo label + exact-match reward
    majority + HSR    majority vote + hard-soft reward
    Med-Evo           FPL + HSR
    oracle            exact match against the ground truth: the supervised upper bound
    ... N = 32        TTRL and Med-Evo choosing the pseudo label from 32 samples (--label-samples 32),
                      training on G = 8 of them

Every row runs `train.py` with the same flags (HPARAMS, chosen once on the target-domain `dev` split,
see docs/results.md) except the method's; nothing is tuned per row or on `test`. Each row runs on every base
model (separate warm starts: `python -m models.tiny --seed S`) and every RL seed. Written to --out:
table.md, ablation.json (rows -> metrics with mean, std and per-run values; the paired Med-Evo - TTRL
differences; per question type), evolution.png (with matplotlib), and each run's folder.

    python -m experiments.ablate --base-seeds 0 1 2 --rl-seeds 0 --jobs 2 --out runs/ablation     # add --reuse to continue

Premises before results: each base model's report.json (tiny.py; written first if missing) is checked
against the premises, and when some base models fail them table.md gives a second table over those that
meet them only. The collapse monitor (train.py --stop-on-collapse) is evaluated after the fact on every run's
evaluations: where would it have stopped, and what score would the kept checkpoint have had.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from scale import checkpoint
import evaluate
import monitor
from models import tiny
import train

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # (key, name, train.py flags)
    ("ttrl", "TTRL (majority + exact)", ["--pseudo-label", "majority", "--reward", "exact"]),
    ("fpl-exact", "FPL + exact", ["--pseudo-label", "fpl", "--reward", "exact"]),
    ("majority-hsr", "majority + HSR", ["--pseudo-label", "majority", "--reward", "hsr"]),
    ("medevo", "Med-Evo (FPL + HSR)", ["--pseudo-label", "fpl", "--reward", "hsr"]),
    ("oracle", "oracle reward (ground truth)", ["--pseudo-label", "fpl", "--reward", "oracle"]),
    ("ttrl-n32", "TTRL, label from N = 32",
     ["--pseudo-label", "majority", "--reward", "exact", "--label-samples", "32"]),
    ("medevo-n32", "Med-Evo, label from N = 32",
     ["--pseudo-label", "fpl", "--reward", "hsr", "--label-samples", "32"]),
]
DEFAULT_ROWS = [key for key, _, _ in ROWS]
# The collapse-resistant rules of issue 18, each on top of TTRL and, where it composes, of Med-Evo: not in the
# default ablation (--rows picks them). kappa (train.py --consensus-min): 0.5 for RESTRAIN (our choice: its value
# was not reachable), 0.25 for EMPO (verl-empo's entropy_thresholding).
TTRL, MEDEVO = ["--pseudo-label", "majority", "--reward", "exact"], ["--pseudo-label", "fpl", "--reward", "hsr"]
COLLAPSE_ROWS = [
    ("ttrl-restrain", "TTRL + low-consensus penalty (RESTRAIN)", [*TTRL, "--consensus-min", "0.5"]),
    ("medevo-restrain", "Med-Evo + low-consensus penalty (RESTRAIN)", [*MEDEVO, "--consensus-min", "0.5"]),
    ("ttrl-empo", "TTRL + low-consensus drop (EMPO)", [*TTRL, "--consensus-min", "0.25", "--low-consensus", "drop"]),
    ("ttrl-ema", "TTRL, label from an EMA teacher (Co-rewarding-II)", [*TTRL, "--ema-teacher"]),
    ("medevo-ema", "Med-Evo, label from an EMA teacher", [*MEDEVO, "--ema-teacher"]),
    ("evol-rl", "majority + novelty reward (EVOL-RL)", [*TTRL, "--novelty"]),
    ("medevo-novelty", "FPL label + novelty reward (replaces HSR)", [*MEDEVO, "--novelty"]),
    ("entropy", "entropy reward, no label (RENT)", ["--pseudo-label", "majority", "--reward", "entropy"]),
]
ROWS += COLLAPSE_ROWS
# The break-even sweep: HSR against a label that is the truth with probability p (train.py --reward noisy-oracle).
NOISY_ACCURACIES = ["0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]
ROWS += [(f"noisy-{p}", f"noisy oracle, label accuracy {p}",
          ["--pseudo-label", "fpl", "--reward", "noisy-oracle", "--label-accuracy", p]) for p in NOISY_ACCURACIES]
# The oracle's setting, chosen once on the target-domain dev split (docs/results.md); --settings gives each row its own.
HPARAMS = ["--lr", "1e-4", "--epochs", "3", "--kl-coef", "0.04"]
FIXED = ["--dataset", "synthetic", "--split", "test", "--group-size", "8", "--temperature", "1.0",
         "--eval-every", "48", "--save-every", "100000"]  # 143 steps an epoch: 3 evaluations an epoch
# The per-row dev grid (--dev-grid): every lr for DEV_EPOCHS epochs on dev from base model 0, an evaluation
# per epoch; a row's setting is its best dev score over every (lr, epoch) AND no adaptation (step 0).
DEV_LRS = ["1e-5", "3e-5", "1e-4"]
DEV_EPOCHS = 3
WINDOW = 10  # steps averaged for "start" and "end" of the hit rate and consensus
LABEL_QUALITY = ["contested_share", "contested_hit_rate", "contested_greedy_rate", "reward_accuracy", "hit_rate"]
RULE_LOGS = ["untrusted"]  # share of groups below --consensus-min (RESTRAIN's penalty, EMPO's drop); 0 without it
METRICS = ["overall", "open_recall", "closed_acc"]


# ----------------------------------------------------------------------------------------------
# Running


def base_model_dir(seed):
    """The shipped base model of warm-start seed `seed` (models/tiny-base-seedS), every file hash-checked."""
    return tiny.shipped_model(seed)


def base_premises(seed, data_root):
    """Build base model `seed` if needed; True if its report.json (written if missing) meets tiny.py's premises."""
    model_dir = tiny.ensure_tiny_base(base_model_dir(seed), data_root, seed=seed)
    path = model_dir / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else tiny.write_report(model_dir, data_root, seed=seed)
    met = all(tiny.premises(report).values())
    print(f"base model seed {seed}: premises {'met' if met else 'NOT met'} ({path})", flush=True)
    return met


def run_folder(out, base_seed, rl_seed, key):
    return out / f"base{base_seed}-rl{rl_seed}" / key


def run_train(out_dir, model_dir, rl_seed, flags, extra, threads, hparams=HPARAMS):
    """One train.py run (a later flag overrides an earlier one); returns its metrics.jsonl rows and wall time."""
    cmd = [sys.executable, str(REPO / "train.py"), "--out-dir", str(out_dir), "--overwrite", "--model", str(model_dir),
           "--seed", str(rl_seed), *FIXED, *hparams, *flags, *extra]
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = out_dir.with_name(out_dir.name + ".log")  # beside the run (train.py --overwrite clears the run folder)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:  # a file, not a pipe: a run outlives an interrupted ablate.py instead of blocking
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    (out_dir / "wall_seconds.json").write_text(json.dumps(time.time() - t0))
    return finished_run(out_dir)


def finished_run(out_dir):
    """(rows, seconds) of a run that reached its final evaluation, else None."""
    path, seconds = out_dir / "metrics.jsonl", out_dir / "wall_seconds.json"
    if not path.is_file() or not seconds.is_file():
        return None
    rows = checkpoint.read_rows(path)
    return (rows, json.loads(seconds.read_text())) if rows and rows[-1].get("eval") == "final" else None


# ----------------------------------------------------------------------------------------------
# One run's summary


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def monitor_verdict(evals, args):
    """Where --stop-on-collapse (its default thresholds) would have stopped, and the kept checkpoint's scores."""
    base, kept = evals[0], evals[0]
    for row in evals[1:]:
        reason = monitor.collapse_reason(row, base, args)
        if reason:
            return {"fired_at_step": row["step"], "reason": reason, "kept_step": kept["step"],
                    "kept": {k: kept[k] for k in METRICS}}
        kept = row
    return {"fired_at_step": None, "reason": None, "kept_step": evals[-1]["step"],
            "kept": {k: evals[-1][k] for k in METRICS}}


def summarise(rows, seconds, monitor_args):
    evals = [r for r in rows if "eval" in r]
    steps = [r for r in rows if "eval" not in r]
    return {
        "before": {k: evals[0][k] for k in METRICS}, "after": {k: evals[-1][k] for k in METRICS},
        "seconds": seconds,
        "hit_start": mean(r["hit_rate"] for r in steps[:WINDOW]),
        "hit_end": mean(r["hit_rate"] for r in steps[-WINDOW:]),
        "consensus_start": mean(r["consensus"] for r in steps[:WINDOW]),
        "consensus_end": mean(r["consensus"] for r in steps[-WINDOW:]),
        "closed_top_share": [(r["step"], r["closed_top_share"]) for r in evals],
        "answer_entropy": [(r["step"], r["answer_entropy"]) for r in evals],
        "reward_curve": [(r["step"], r["reward"]) for r in steps],
        "consensus_curve": [(r["step"], r["consensus"]) for r in steps],
        "score_curve": [(r["step"], r["overall"]) for r in evals],
        "monitor": monitor_verdict(evals, monitor_args),
        **{key: mean(r.get(key) for r in steps) for key in LABEL_QUALITY + RULE_LOGS},  # over the whole run
        "image_sensitivity_curve": [(r["step"], r.get("image_sensitivity")) for r in evals],
        "image_sensitivity_start": evals[0].get("image_sensitivity"),
        "image_sensitivity_end": evals[-1].get("image_sensitivity"),
        "flips": [(r["step"], r.get("flips_right_to_wrong"), r.get("flips_wrong_to_right")) for r in evals[1:]],
    }


def content_types(data_root):
    """qid -> synthetic content_type of the test split."""
    return {e["qid"]: e["content_type"] for e in json.loads((Path(data_root) / "test.json").read_text())}


def read_predictions(run_dir, tag):
    """One evaluation's predictions_{tag}.jsonl: dicts with qid, question, answer_type, prediction, score."""
    return [json.loads(line) for line in (run_dir / f"predictions_{tag}.jsonl").read_text().splitlines()]


def by_content_type(preds, types):
    """Mean score per synthetic content_type of one evaluation's predictions."""
    scores = {}
    for p in preds:
        scores.setdefault(types[p["qid"]], []).append(p["score"])
    return {t: statistics.mean(v) for t, v in sorted(scores.items())}


def same_question_share(preds):
    """Label-free: evaluate.answer_statistics' same-question top share of one evaluation's predictions."""
    return evaluate.answer_statistics(preds, [p["prediction"] for p in preds])["same_question_top_share"]


# ----------------------------------------------------------------------------------------------
# Tables


def spread(values):
    """{"mean", "std", "values"} in percent (std over runs; 0 for one run)."""
    values = [100 * v for v in values]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def cell(s):
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def aggregate(results, rows):
    """rows -> metrics with mean, std and per-run values (percent)."""
    first = results[rows[0][0]]
    table = {"base model (no adaptation)": {k: spread([r["before"][k] for r in first]) for k in METRICS}}
    for key, name, _ in rows:
        runs = results[key]
        table[name] = {k: spread([r["after"][k] for r in runs]) for k in METRICS}
        if any(r.get("no_adaptation") for r in runs):
            table[name]["dev_choice"] = "no adaptation"
            continue
        for k in ["hit_start", "hit_end", "consensus_start", "consensus_end", "same_question_start",
                  "same_question_end", "image_sensitivity_start", "image_sensitivity_end", *LABEL_QUALITY, *RULE_LOGS]:
            values = [r.get(k) for r in runs]
            table[name][k] = spread(values) if None not in values else None
        table[name]["seconds"] = statistics.mean(r["seconds"] for r in runs)
        table[name]["monitor_fired"] = sum(r["monitor"]["fired_at_step"] is not None for r in runs)
        table[name]["monitor_kept_overall"] = spread([r["monitor"]["kept"]["overall"] for r in runs])
    return table


def markdown(table, n_runs):
    def pct(s):
        return "–" if s is None else f"{s['mean']:.1f}"

    lines = [f"| method (n = {n_runs} runs) | open recall | closed acc. | overall | hit rate start → end | "
             "consensus start → end | contested share | contested: label right / greedy right | reward accuracy | "
             "image sensitivity before → after | same-question top share before → after | monitor fired | "
             "overall kept by the monitor | wall time (s) |",
             "|---" * 14 + "|"]
    for name, row in table.items():
        scores = f"| {name} | {cell(row['open_recall'])} | {cell(row['closed_acc'])} | {cell(row['overall'])} |"
        if "hit_start" not in row:
            note = "dev choice: no adaptation" if row.get("dev_choice") else "–"
            lines.append(scores + f" {note} |" + " – |" * 10)
            continue
        lines.append(scores + f" {pct(row['hit_start'])} → {pct(row['hit_end'])} | "
                     f"{pct(row['consensus_start'])} → {pct(row['consensus_end'])} | {pct(row['contested_share'])} | "
                     f"{pct(row['contested_hit_rate'])} / {pct(row['contested_greedy_rate'])} | "
                     f"{pct(row['reward_accuracy'])} | "
                     f"{pct(row['image_sensitivity_start'])} → {pct(row['image_sensitivity_end'])} | "
                     f"{pct(row['same_question_start'])} → {pct(row['same_question_end'])} | "
                     f"{row['monitor_fired']}/{n_runs} | {cell(row['monitor_kept_overall'])} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def paired(results, a="medevo", b="ttrl"):
    """Per run (same base model, same RL seed): a's final overall minus b's, in points."""
    return [100 * (x["after"]["overall"] - y["after"]["overall"]) for x, y in zip(results[a], results[b])]


def per_run(diffs, run_ids):
    return ", ".join(f"{d:+.2f} (base {b}, rl {r})" for d, (b, r) in zip(diffs, run_ids))


def content_table(types):
    """Mean over runs of each row's per-type score change against the base model, in points."""
    names = list(types)  # "base", then the rows run
    all_types = sorted(types["base"][0])
    lines = ["| question type | base | " + " | ".join(n for n in names[1:]) + " |", "|---" * len(names) + "|---|"]
    for t in all_types:
        base = statistics.mean(100 * run[t] for run in types["base"])
        deltas = [statistics.mean(100 * run[t] for run in types[name]) - base for name in names[1:]]
        lines.append(f"| {t} | {base:.1f} | " + " | ".join(f"{d:+.1f}" for d in deltas) + " |")
    return "\n".join(lines)


def plot_evolution(runs, path):
    """Med-Evo runs: reward and consensus per step (top); score, top CLOSED share and entropy per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    entropy_axis = bottom.twinx()
    for i, run in enumerate(runs):
        def label(text):
            return text if i == 0 else None

        top.plot(*zip(*run["reward_curve"]), color="tab:blue", alpha=0.4, label=label("mean HSR reward"))
        top.plot(*zip(*run["consensus_curve"]), color="tab:green", alpha=0.4, label=label("consensus"))
        steps, overall = zip(*run["score_curve"])
        bottom.plot(steps, [100 * x for x in overall], "o-", color="tab:red", label=label("overall score %"))
        steps, share = zip(*run["closed_top_share"])
        bottom.plot(steps, [100 * x for x in share], "s--", color="tab:purple", label=label("top CLOSED answer %"))
        steps, entropy = zip(*run["answer_entropy"])
        entropy_axis.plot(steps, entropy, "^:", color="tab:gray", label=label("answer entropy (nats)"))
    top.set_ylabel("per training step")
    top.legend(loc="lower right")
    bottom.set_ylabel("per evaluation (%)")
    entropy_axis.set_ylabel("answer entropy (nats)", color="tab:gray")
    bottom.set_xlabel("training step")
    bottom.legend(loc="lower left")
    top.set_title("Med-Evo on the synthetic target split: reward, consensus and the collapse monitor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------


def break_even(table, rows):
    """The noisy-oracle sweep: per label accuracy p, the final score and the measured label accuracy (overall
    and on contested groups); p* where the score curve first crosses the base model's (linear between
    neighbours; None if it never does), on the p asked and on the label accuracy measured on contested groups
    (the scale of a label-free row's contested hit rate); and each label-free row's contested hit rate."""
    base = table["base model (no adaptation)"]["overall"]["mean"]
    sweep = [{"p": float(key.split("-")[1]), "overall": table[name]["overall"], "hit_rate": table[name]["hit_rate"],
              "contested_hit_rate": table[name]["contested_hit_rate"]}
             for key, name, _ in rows if key.startswith("noisy-")]
    contested = [(s["contested_hit_rate"]["mean"], s["overall"]["mean"]) for s in sweep if s["contested_hit_rate"]]
    label_free = {name: table[name]["contested_hit_rate"] for key, name, flags in rows
                  if not key.startswith("noisy-") and key != "oracle" and "hit_start" in table[name]}
    return {"base_overall": base, "sweep": sweep, "p_star": crossing([(s["p"], s["overall"]["mean"]) for s in sweep],
                                                                      base),
            "p_star_contested": crossing(contested, base) if len(contested) == len(sweep) else None,
            "label_free_contested_hit_rate": label_free}


def crossing(points, level):
    """The first x where the piecewise-linear curve through (x, y) points rises through `level` (None if never)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < level <= y1:
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0)
    return None


def plot_break_even(result, path):
    """Final score against label accuracy (p asked, and measured on contested groups), the base model's score,
    and each label-free row's measured contested hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sweep = result["sweep"]
    ax.errorbar([s["p"] * 100 for s in sweep], [s["overall"]["mean"] for s in sweep],
                yerr=[s["overall"]["std"] for s in sweep], fmt="o-", color="tab:red", label="noisy oracle: p asked")
    measured = [(s["contested_hit_rate"]["mean"], s["overall"]["mean"]) for s in sweep if s["contested_hit_rate"]]
    if measured:
        ax.plot(*zip(*measured), "s--", color="tab:orange", label="noisy oracle: label accuracy on contested groups")
    ax.axhline(result["base_overall"], color="black", lw=1, label="base model (no adaptation)")
    for i, (name, rate) in enumerate(result["label_free_contested_hit_rate"].items()):
        if rate is not None:
            ax.axvline(rate["mean"], color=f"C{i + 2}", ls=":", label=f"{name}: contested hit rate")
    ax.set_xlabel("label accuracy (%)")
    ax.set_ylabel("overall score after adaptation (%)")
    ax.set_title("Break-even label accuracy" + (f": p* = {100 * result['p_star']:.0f}%" if result["p_star"] else ""))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------
# Running many: a pool of train.py runs, and the per-row dev grid


@dataclass
class Job:
    """One train.py run of the ablation."""
    key: tuple  # what the results are filed under
    out_dir: Path
    model_dir: Path
    rl_seed: int
    flags: list  # the row's method flags, then its setting's
    hparams: list
    label: str  # for the progress line


def run_jobs(jobs, n_parallel, extra):
    """Run every job not already finished in its folder; returns {key: (rows, seconds)} and how many were reused."""
    finished = {job.key: done for job in jobs if (done := finished_run(job.out_dir)) is not None}  # --reuse
    reused, t_start = len(finished), time.time()
    threads = max(1, (os.cpu_count() or 1) // n_parallel)
    with ThreadPoolExecutor(n_parallel) as pool:
        futures = {pool.submit(run_train, job.out_dir, job.model_dir, job.rl_seed, job.flags, extra, threads,
                               job.hparams): job for job in jobs if job.key not in finished}
        for future in as_completed(futures):
            (metrics, seconds), job = future.result(), futures[future]
            finished[job.key] = metrics, seconds
            eta = (time.time() - t_start) / (len(finished) - reused) * (len(jobs) - len(finished))
            print(f"[{len(finished)}/{len(jobs)}] {job.label}: overall {100 * metrics[0]['overall']:.2f} -> "
                  f"{100 * metrics[-1]['overall']:.2f} ({seconds:.0f}s) | ETA {monitor.format_eta(eta)}",
                  flush=True)
    return finished, reused


def dev_candidates(rows_logged, lr, steps_per_epoch):
    """The (lr, epochs) candidates of one dev run: its evaluation after each epoch, in percent."""
    evals = {r["step"]: r["overall"] for r in rows_logged if "eval" in r and r["step"] > 0}
    return [{"lr": lr, "epochs": step // steps_per_epoch, "steps": step, "overall": 100 * overall}
            for step, overall in sorted(evals.items()) if step % steps_per_epoch == 0]


def choose_setting(candidates):
    """The best dev score; the first candidate (no adaptation) wins ties, so adapting must do strictly better."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate["overall"] > best["overall"]:
            best = candidate
    return best


def dev_grid(rows, base_seed, n_parallel, extra, out):
    """Every row x DEV_LRS for DEV_EPOCHS epochs on dev (adapt on dev, score dev); writes dev_choices.json."""
    steps_per_epoch = len(json.loads((tiny.ensure_synthetic() / "dev.json").read_text())) // 8
    jobs = [Job((key, lr), run_folder(out, base_seed, 0, f"{key}-lr{lr}"), base_model_dir(base_seed), 0, flags,
                ["--split", "dev", "--lr", lr, "--epochs", str(DEV_EPOCHS), "--eval-every", str(steps_per_epoch),
                 "--kl-coef", "0.04"], f"dev | {name} | lr {lr}")
            for key, name, flags in rows for lr in DEV_LRS]
    finished, _ = run_jobs(jobs, n_parallel, extra)
    choices = {}
    for key, name, _ in rows:
        runs = {lr: finished[key, lr][0] for lr in DEV_LRS}
        none = {"lr": None, "epochs": 0, "steps": 0, "overall": 100 * runs[DEV_LRS[0]][0]["overall"]}
        candidates = [none] + [c for lr in DEV_LRS for c in dev_candidates(runs[lr], lr, steps_per_epoch)]
        choices[key] = {"name": name, "choice": choose_setting(candidates), "candidates": candidates,
                        "runs": {lr: str(run_folder(out, base_seed, 0, f"{key}-lr{lr}")) for lr in DEV_LRS},
                        "dev_curves": {lr: dev_curve(runs[lr]) for lr in DEV_LRS}}
    (out / "dev_choices.json").write_text(json.dumps({"base_seed": base_seed, "rows": choices}, indent=1))
    text = dev_markdown(choices)
    (out / "dev_table.md").write_text(text + "\n")
    print(text + f"\nwrote {out / 'dev_choices.json'} and {out / 'dev_table.md'}")


def dev_curve(rows_logged):
    """Per evaluation of a dev run: step, overall, image sensitivity, same-question share (label-free signs)."""
    return [{k: r.get(k) for k in ("step", "overall", "image_sensitivity", "same_question_top_share",
                                   "closed_top_share", "answer_entropy", "flips_right_to_wrong",
                                   "flips_wrong_to_right")} for r in rows_logged if "eval" in r]


def dev_markdown(choices):
    lines = ["| row | no adaptation | " + " | ".join(f"lr {lr}, epoch {e}" for lr in DEV_LRS
                                                    for e in range(1, DEV_EPOCHS + 1)) + " | dev choice |",
             "|---" * (2 + len(DEV_LRS) * DEV_EPOCHS) + "|---|"]
    for choice in choices.values():
        c = choice["choice"]
        chosen = "no adaptation" if c["lr"] is None else f"lr {c['lr']}, {c['epochs']} epoch(s)"
        lines.append(f"| {choice['name']} | " + " | ".join(f"{x['overall']:.2f}" for x in choice["candidates"])
                     + f" | **{chosen}** |")
    return "\n".join(lines)


def read_settings(path):
    """--settings: a dev_choices.json written by --dev-grid, or None."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--settings {path}: not a readable dev_choices.json ({err})") from err


def row_setting(key, settings):
    """The row's hparams from --settings (dev_choices.json): None = no adaptation; HPARAMS without --settings."""
    if settings is None:
        return HPARAMS
    rows = settings["rows"]
    source = key if key in rows else "oracle" if key.startswith("noisy-") else None  # noisy rows: the oracle's
    if source is None:
        raise SystemExit(f"--settings has no dev choice for row {key!r} (it has {sorted(rows)}): run --dev-grid "
                         f"with that row first")
    choice = rows[source]["choice"]
    return None if choice["lr"] is None else ["--lr", choice["lr"], "--epochs", str(choice["epochs"]),
                                              "--kl-coef", "0.04"]


def no_adaptation_summary(base_rows):
    """A row whose dev choice is no adaptation: its test score is the base model's (step-0 evaluation)."""
    evals = [r for r in base_rows if "eval" in r]
    return {"before": {k: evals[0][k] for k in METRICS}, "after": {k: evals[0][k] for k in METRICS},
            "no_adaptation": True}


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="warm-start seeds of the base models")
    parser.add_argument("--rl-seeds", type=int, nargs="+", default=[0], help="train.py --seed of each run")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help=f"row keys to run (default: the methods; the break-even sweep: "
                             f"{' '.join(f'noisy-{p}' for p in NOISY_ACCURACIES)}; the collapse-resistant rules: "
                             f"{' '.join(key for key, _, _ in COLLAPSE_ROWS)})")
    parser.add_argument("--dev-grid", action="store_true",
                        help="choose each row's setting on dev from the first --base-seeds model: DEV_LRS x DEV_EPOCHS "
                             "and no adaptation; writes dev_choices.json (give it to a test ablation as --settings)")
    parser.add_argument("--settings", default=None,
                        help="dev_choices.json of a --dev-grid: each row runs with its own dev-chosen lr and epochs, "
                             "or not at all when its choice is no adaptation (noisy-* rows take the oracle's); "
                             "default: every row at the oracle's setting HPARAMS")
    parser.add_argument("--out", default="runs/ablation",
                        help="where the runs, table.md, ablation.json and evolution.png go")
    parser.add_argument("--no-plot", action="store_true", help="skip evolution.png (it needs matplotlib)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train.py runs at a time, each with cores / jobs threads (2 on 2 cores: ~1.7x faster)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished runs already in --out (an interrupted ablation continues)")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="flags after -- go to every train.py run after ours (e.g. -- --max-steps 3 for a smoke "
                             "test; a tuned flag here makes the table no longer the dev-chosen one)")
    args = parser.parse_args()
    extra = [f for f in args.extra if f != "--"]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.reuse:
        raise SystemExit(f"--out {out} is not empty: choose another folder so that no result is overwritten, or "
                         f"add --reuse to keep its finished runs and run the rest")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be an integer >= 1")
    unknown = set(args.rows) - {key for key, _, _ in ROWS}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {[key for key, _, _ in ROWS]}")
    if not args.no_plot:
        import matplotlib  # noqa: F401  (fail now, not after the runs: pip install matplotlib, or --no-plot)
    rows = [row for key in args.rows for row in ROWS if row[0] == key]  # in the order given
    settings = read_settings(args.settings)
    if args.dev_grid:
        return dev_grid(rows, args.base_seeds[0], args.jobs, extra, out)
    monitor_args = train.parse_args(["--stop-on-collapse", "--eval-every", "1"])  # the default thresholds
    data_root = tiny.ensure_synthetic()
    premises_met = {seed: base_premises(seed, data_root) for seed in args.base_seeds}  # premises before results

    t_start = time.time()
    run_ids = [(b, r) for b in args.base_seeds for r in args.rl_seeds]  # the order of every per-run list
    hparams = {key: row_setting(key, settings) for key, _, _ in rows}  # None: the dev choice is no adaptation
    adapted = [key for key, _, _ in rows if hparams[key]]
    if not adapted:
        raise SystemExit("every row's dev choice is no adaptation: there is nothing to run")
    noisy = [row for row in rows if row[0].startswith("noisy-")]  # the break-even sweep: the first run id only
    rows = [row for row in rows if row not in noisy]
    jobs = [Job((b, r, key), run_folder(out, b, r, key), base_model_dir(b), r, flags, hparams[key],
                f"base {b} rl {r} | {name}") for b, r in run_ids for key, name, flags in rows + noisy
            if hparams[key] and ((b, r) == run_ids[0] or (key, name, flags) not in noisy)]
    finished, reused = run_jobs(jobs, args.jobs, extra)
    results, types = {key: [] for key, _, _ in rows + noisy}, {"base": [], **{name: [] for _, name, _ in rows}}
    type_of_qid = content_types(data_root)
    for b, r in run_ids:
        base_run = run_folder(out, b, r, adapted[0])
        for key, name, flags in rows + (noisy if (b, r) == run_ids[0] else []):  # in row order
            run_dir = run_folder(out, b, r, key) if hparams[key] else base_run
            before, after = (read_predictions(run_dir, tag) for tag in ("step0", "final" if hparams[key] else "step0"))
            results[key].append(summarise(*finished[b, r, key], monitor_args) if hparams[key]
                                else no_adaptation_summary(finished[b, r, adapted[0]][0]))
            results[key][-1].update(same_question_start=same_question_share(before),
                                    same_question_end=same_question_share(after))
            if name in types:  # the method rows (not the sweep)
                types[name].append(by_content_type(after, type_of_qid))
            if key == rows[0][0]:
                types["base"].append(by_content_type(before, type_of_qid))

    table = aggregate({key: results[key] for key, _, _ in rows}, rows)
    text = markdown(table, len(run_ids))
    report = {"hparams": HPARAMS if settings is None else {key: hp or "none" for key, hp in hparams.items()},
              "settings": args.settings, "dev_choices": None if settings is None else settings["rows"],
              "fixed": FIXED, "extra": extra, "base_seeds": args.base_seeds,
              "rl_seeds": args.rl_seeds, "run_ids": run_ids, "base_premises_met": premises_met,
              "rows": table, "runs": results,
              "wall_seconds": time.time() - t_start, "runs_reused": reused,  # reused runs' time is not in it
              "run_seconds_sum": sum(seconds for _, seconds in finished.values())}  # each run's own wall time
    kept = [i for i, (b, _) in enumerate(run_ids) if premises_met[b]]
    if 0 < len(kept) < len(run_ids):  # the same table over the base models that meet the premises only
        report["rows_premises_met"] = aggregate({k: [v[i] for i in kept] for k, v in results.items()}, rows)
        text += (f"\n\nOnly the base models that meet the premises (seeds "
                 f"{[b for b in args.base_seeds if premises_met[b]]}):\n\n"
                 + markdown(report["rows_premises_met"], len(kept)))
    if "medevo" in results and "ttrl" in results:
        report["medevo_minus_ttrl"] = paired(results)
        text += "\n\nMed-Evo − TTRL, overall, per run: " + per_run(report["medevo_minus_ttrl"], run_ids)
    if "medevo-n32" in results and "ttrl-n32" in results:
        report["medevo_minus_ttrl_n32"] = paired(results, "medevo-n32", "ttrl-n32")
        text += "\nwith N = 32: " + per_run(report["medevo_minus_ttrl_n32"], run_ids)
    report["by_content_type"] = types
    text += ("\n\nScore change per question type against the base model (points, mean over runs):\n\n"
             + content_table(types))
    (out / "table.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    print(text)
    print(f"wrote {out / 'table.md'} and {out / 'ablation.json'} ({monitor.format_eta(time.time() - t_start)}, "
          f"{reused} of {len(jobs)} runs reused)")
    if not args.no_plot and "medevo" in results:
        plot_evolution(results["medevo"], out / "evolution.png")
        print(f"wrote {out / 'evolution.png'}")
    if noisy:  # on the first run id's base model: the sweep, and the method rows' contested hit rates beside it
        first = aggregate({key: runs[:1] for key, runs in results.items()}, rows + noisy)
        report["break_even"] = dict(break_even(first, rows + noisy), run_id=run_ids[0],
                                    rows=markdown(first, 1))
        (out / "ablation.json").write_text(json.dumps(report, indent=1))
        print(f"break-even label accuracy p* = {report['break_even']['p_star']} (asked); "
              f"{report['break_even']['p_star_contested']} (measured on contested groups, %)")
        if not args.no_plot:
            plot_break_even(report["break_even"], out / "break_even.png")
            print(f"wrote {out / 'break_even.png'}")


if __name__ == "__main__":
    main()
