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
see README) except the method's; nothing is tuned per row or on `test`. Each row runs on every base
model (separate warm starts: `python tiny.py --seed S`) and every RL seed. Written to --out:
table.md, ablation.json (rows -> metrics with mean, std and per-run values; the paired Med-Evo - TTRL
differences; per question type), evolution.png (with matplotlib), and each run's folder.

    python ablate.py --base-seeds 0 1 2 --rl-seeds 0 --jobs 2 --out runs/ablation     # add --reuse to continue

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
from pathlib import Path

import checkpoint
import evaluate
import tiny
import train

REPO = Path(__file__).resolve().parent
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
# Chosen once on the target-domain dev split (README, "Adaptation hyperparameters, chosen on dev"), for every row.
HPARAMS = ["--lr", "1e-4", "--epochs", "3", "--kl-coef", "0.04"]
FIXED = ["--dataset", "synthetic", "--split", "test", "--group-size", "8", "--temperature", "1.0",
         "--eval-every", "48", "--save-every", "100000"]  # 143 steps an epoch: 3 evaluations an epoch
WINDOW = 10  # steps averaged for "start" and "end" of the hit rate and consensus
METRICS = ["overall", "open_recall", "closed_acc"]


# ----------------------------------------------------------------------------------------------
# Running


def base_model_dir(seed):
    return tiny.TINY_BASE_DIR if seed == 0 else tiny.TINY_BASE_DIR.with_name(f"tiny-base-seed{seed}")


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


def run_train(out_dir, model_dir, rl_seed, flags, extra, threads):
    """One train.py run; returns its metrics.jsonl rows and wall time."""
    cmd = [sys.executable, str(REPO / "train.py"), "--out-dir", str(out_dir), "--overwrite", "--model", str(model_dir),
           "--seed", str(rl_seed), *FIXED, *HPARAMS, *flags, *extra]
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
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
        reason = train.collapse_reason(row, base, args)
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
        for k in ["hit_start", "hit_end", "consensus_start", "consensus_end", "same_question_start",
                  "same_question_end"]:
            table[name][k] = spread([r[k] for r in runs])
        table[name]["seconds"] = statistics.mean(r["seconds"] for r in runs)
        table[name]["monitor_fired"] = sum(r["monitor"]["fired_at_step"] is not None for r in runs)
        table[name]["monitor_kept_overall"] = spread([r["monitor"]["kept"]["overall"] for r in runs])
    return table


def markdown(table, n_runs):
    lines = [f"| method (n = {n_runs} runs) | open recall | closed acc. | overall | hit rate start → end | "
             "consensus start → end | same-question top share before → after | monitor fired | "
             "overall kept by the monitor | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if "hit_start" not in row:
            lines.append(f"| {name} | {cell(row['open_recall'])} | {cell(row['closed_acc'])} | {cell(row['overall'])} "
                         "| – | – | – | – | – | – |")
            continue
        lines.append(f"| {name} | {cell(row['open_recall'])} | {cell(row['closed_acc'])} | {cell(row['overall'])} | "
                     f"{row['hit_start']['mean']:.1f} → {row['hit_end']['mean']:.1f} | "
                     f"{row['consensus_start']['mean']:.1f} → {row['consensus_end']['mean']:.1f} | "
                     f"{row['same_question_start']['mean']:.1f} → {row['same_question_end']['mean']:.1f} | "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="warm-start seeds of the base models")
    parser.add_argument("--rl-seeds", type=int, nargs="+", default=[0], help="train.py --seed of each run")
    parser.add_argument("--rows", nargs="+", default=[key for key, _, _ in ROWS], help="row keys to run")
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
    rows = [row for row in ROWS if row[0] in args.rows]
    monitor_args = train.parse_args(["--stop-on-collapse", "--eval-every", "1"])  # the default thresholds
    data_root = tiny.ensure_synthetic()
    premises_met = {seed: base_premises(seed, data_root) for seed in args.base_seeds}  # premises before results

    jobs = [(b, r, row) for b in args.base_seeds for r in args.rl_seeds for row in rows]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t_start = time.time()
    finished = {(b, r, key): done for b, r, (key, _, _) in jobs  # (base seed, RL seed, row key) -> (rows, seconds)
                if (done := finished_run(run_folder(out, b, r, key))) is not None}  # kept by --reuse
    reused = len(finished)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_train, run_folder(out, b, r, key), base_model_dir(b), r, flags, extra, threads):
                   (b, r, key, name) for b, r, (key, name, flags) in jobs if (b, r, key) not in finished}
        for future in as_completed(futures):
            (metrics, seconds), (b, r, key, name) = future.result(), futures[future]
            finished[b, r, key] = metrics, seconds
            eta = (time.time() - t_start) / (len(finished) - reused) * (len(jobs) - len(finished))
            print(f"[{len(finished)}/{len(jobs)}] base {b} rl {r} | {name}: overall {100 * metrics[0]['overall']:.2f} "
                  f"-> {100 * metrics[-1]['overall']:.2f} ({seconds:.0f}s) | ETA {train.format_eta(eta)}", flush=True)
    results, types = {key: [] for key, _, _ in rows}, {"base": [], **{name: [] for _, name, _ in rows}}
    type_of_qid = content_types(data_root)
    for b, r, (key, name, flags) in jobs:  # in job order, whatever order they finished in
        before, after = (read_predictions(run_folder(out, b, r, key), tag) for tag in ("step0", "final"))
        results[key].append(summarise(*finished[b, r, key], monitor_args))
        results[key][-1].update(same_question_start=same_question_share(before),
                                same_question_end=same_question_share(after))
        types[name].append(by_content_type(after, type_of_qid))
        if key == rows[0][0]:
            types["base"].append(by_content_type(before, type_of_qid))

    table = aggregate(results, rows)
    run_ids = [(b, r) for b in args.base_seeds for r in args.rl_seeds]  # the order of every per-run list
    text = markdown(table, len(run_ids))
    report = {"hparams": HPARAMS, "fixed": FIXED, "extra": extra, "base_seeds": args.base_seeds,
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
    report["by_content_type"] = {name: runs for name, runs in types.items()}
    text += ("\n\nScore change per question type against the base model (points, mean over runs):\n\n"
             + content_table(types))
    (out / "table.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    print(text)
    print(f"wrote {out / 'table.md'} and {out / 'ablation.json'} ({train.format_eta(time.time() - t_start)}, "
          f"{reused} of {len(jobs)} runs reused)")
    if not args.no_plot and "medevo" in results:
        plot_evolution(results["medevo"], out / "evolution.png")
        print(f"wrote {out / 'evolution.png'}")


if __name__ == "__main__":
    main()
