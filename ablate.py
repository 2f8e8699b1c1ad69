"""The miniature Med-Evo experiment: the ablation table and the evolution curve (paper Fig. 3).

Each row adapts the same tiny base model on the synthetic target split (unlabeled) with one
combination of pseudo-labeler and reward, over several seeds, and reports the mean +- std of
the final scores on that split:

    base        no adaptation (greedy answers of the warm-started model)
    TTRL        majority vote + exact-match reward
    FPL+exact   feature-driven pseudo label + exact-match reward
    maj+HSR     majority vote + hard-soft reward
    Med-Evo     FPL + HSR
    oracle      exact match against the ground truth: the supervised upper bound

Every row runs `train.py` with the same flags except --pseudo-label/--reward; nothing here is
tuned per row. It writes <out>/table.md, <out>/results.json and, with matplotlib installed,
<out>/evolution.png (mean reward and overall score against step for the Med-Evo runs).

    python ablate.py --seeds 0 1 2            # about 5 minutes a seed on 2 CPU cores
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
ROWS = [  # (name, --pseudo-label, --reward)
    ("TTRL (majority + exact)", "majority", "exact"),
    ("FPL + exact", "fpl", "exact"),
    ("majority + HSR", "majority", "hsr"),
    ("Med-Evo (FPL + HSR)", "fpl", "hsr"),
    ("oracle reward (ground truth)", "fpl", "oracle"),
]
HIT_WINDOW = 10  # steps averaged for the hit rate "at the start" and "at the end"


def run_row(out_dir, pseudo_label, reward_kind, seed, train_flags):
    """One train.py run; returns its metrics.jsonl entries and wall time."""
    cmd = [sys.executable, str(REPO / "train.py"), "--out-dir", str(out_dir), "--overwrite", "--seed", str(seed),
           "--pseudo-label", pseudo_label, "--reward", reward_kind, *train_flags]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, time.time() - t0


def summarise(metrics, seconds):
    evals = [m for m in metrics if "eval" in m]
    steps = [m for m in metrics if "eval" not in m]
    return {
        "before": evals[0], "after": evals[-1], "seconds": seconds,
        "hit_start": statistics.mean(m["hit_rate"] for m in steps[:HIT_WINDOW]),
        "hit_end": statistics.mean(m["hit_rate"] for m in steps[-HIT_WINDOW:]),
        "curve": [(m["step"], m["reward"]) for m in steps],
        "eval_curve": [(m["step"], m["overall"]) for m in evals],
    }


def mean_std(values):
    values = [100 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(results, seeds):
    lines = [f"| method (n = {len(seeds)} seeds) | open recall | closed acc. | overall | hit rate start | hit rate end | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    first = results[ROWS[0][0]]
    base = [r["before"] for r in first]
    lines.append(f"| base model (no adaptation) | {mean_std([b['open_recall'] for b in base])} | "
                 f"{mean_std([b['closed_acc'] for b in base])} | {mean_std([b['overall'] for b in base])} | – | – | – |")
    for name, _, _ in ROWS:
        runs = results[name]
        after = [r["after"] for r in runs]
        lines.append(f"| {name} | {mean_std([a['open_recall'] for a in after])} | {mean_std([a['closed_acc'] for a in after])} | "
                     f"{mean_std([a['overall'] for a in after])} | {mean_std([r['hit_start'] for r in runs])} | "
                     f"{mean_std([r['hit_end'] for r in runs])} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def plot_evolution(runs, path):
    """Mean reward (per step) and overall score (per evaluation) of the Med-Evo runs against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4))
    right = left.twinx()
    for seed, run in enumerate(runs):
        steps, rewards = zip(*run["curve"])
        left.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward (per step)" if seed == 0 else None)
        steps, overall = zip(*run["eval_curve"])
        right.plot(steps, [100 * x for x in overall], "o-", color="tab:red", label="overall score % (eval)" if seed == 0 else None)
    left.set_xlabel("training step")
    left.set_ylabel("mean HSR reward", color="tab:blue")
    right.set_ylabel("overall score on the target split (%)", color="tab:red")
    left.set_title("Med-Evo self-evolution on the synthetic target split (tiny Qwen2.5-VL)")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablation", help="where runs, table.md, results.json and evolution.png go")
    parser.add_argument("--no-plot", action="store_true", help="skip evolution.png (it needs matplotlib)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER,
                        help="flags after -- are passed to every train.py run (default: the demo's)")
    args = parser.parse_args()
    train_flags = [f for f in args.train_flags if f != "--"] or DEMO_FLAGS
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: choose another folder so that no result is overwritten")
    if not args.no_plot:
        import matplotlib  # noqa: F401  (fail now, not after the runs: pip install matplotlib, or --no-plot)

    results = {name: [] for name, _, _ in ROWS}
    for seed in args.seeds:
        for name, pseudo_label, reward_kind in ROWS:
            run_dir = out / f"{pseudo_label}-{reward_kind}-seed{seed}"
            metrics, seconds = run_row(run_dir, pseudo_label, reward_kind, seed, train_flags)
            results[name].append(summarise(metrics, seconds))
            print(f"seed {seed} | {name}: overall {100 * results[name][-1]['before']['overall']:.2f} -> "
                  f"{100 * results[name][-1]['after']['overall']:.2f} ({seconds:.0f}s)", flush=True)
    text = table(results, args.seeds)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"train_flags": train_flags, "seeds": args.seeds, "results": results}, indent=1))
    print(text)
    if not args.no_plot:
        plot_evolution(results[ROWS[3][0]], out / "evolution.png")
        print(f"wrote {out / 'evolution.png'}")


DEMO_FLAGS = ["--dataset", "synthetic", "--model", "tiny", "--epochs", "3", "--eval-every", "30",
              "--save-every", "1000"]

if __name__ == "__main__":
    main()
