"""The two readings of the dev grid (docs/results.md), from the runs' metrics.jsonl (docs/dev_grid/runs/ROW-lrLR/).

    python docs/dev_grid/analyse.py [RUNS_DIR]

1. Per self-labelled run and epoch: the contested label-minus-greedy gap (mean over the epoch's steps of
   contested_hit_rate - contested_greedy_rate) against the epoch's dev score change; Pearson r, sign agreement.
2. The image-sensitivity stop rule: for each R, the score of the checkpoint `--stop-on-collapse` would keep
   (the last evaluation before the image sensitivity fell below R x its step-0 value), per run.
"""
import json
import statistics
import sys
from pathlib import Path

EPOCH = 143  # steps an epoch on dev
RATIOS = [0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]


def read_runs(root):
    runs = {}
    for d in sorted(Path(root).glob("*-lr*")):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[d.name] = rows
    return runs


def mean_of(rows, key):
    return statistics.mean(r[key] for r in rows if r.get(key) is not None)


def gap_cells(runs):
    cells = []
    for name, rows in runs.items():
        evals = {r["step"]: r for r in rows if "eval" in r}
        steps = [r for r in rows if "eval" not in r]
        for a in range(0, max(evals), EPOCH):
            epoch = [r for r in steps if a < r["step"] <= a + EPOCH]
            gap = 100 * (mean_of(epoch, "contested_hit_rate") - mean_of(epoch, "contested_greedy_rate"))
            cells.append((name, a // EPOCH + 1, gap, 100 * (evals[a + EPOCH]["overall"] - evals[a]["overall"])))
    return cells


def kept_score(evals, ratio):
    """(score kept, step the rule fired at or None)."""
    last = evals[0]
    for e in evals[1:]:
        if e["image_sensitivity"] < ratio * evals[0]["image_sensitivity"]:
            return 100 * last["overall"], e["step"]
        last = e
    return 100 * evals[-1]["overall"], None


def main():
    runs = read_runs(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs")
    cells = [c for c in gap_cells(runs) if not c[0].startswith("oracle")]
    for name, epoch, gap, change in sorted(cells, key=lambda c: c[2]):
        print(f"{name:22s} epoch {epoch}: contested label - greedy {gap:+5.1f}, dev score {change:+6.2f}")
    x, y = [c[2] for c in cells], [c[3] for c in cells]
    agree = sum((a > 0) == (b > 0) for a, b in zip(x, y))
    print(f"self-labelled cells: {len(cells)}, Pearson r {statistics.correlation(x, y):.2f}, signs agree {agree}")
    print("\nimage-sensitivity stop rule: mean kept dev score (self-labelled runs | oracle runs), fired on oracle")
    for ratio in RATIOS:
        kept = {name: kept_score([r for r in rows if "eval" in r], ratio) for name, rows in runs.items()}
        free = [k for n, (k, _) in kept.items() if not n.startswith("oracle")]
        oracle = [k for n, (k, _) in kept.items() if n.startswith("oracle")]
        fired = sum(s is not None for n, (_, s) in kept.items() if n.startswith("oracle"))
        print(f"R {ratio:<4}: {statistics.mean(free):.2f} | {statistics.mean(oracle):.2f}, oracle fired {fired} | "
              + ", ".join(f"{n} {k:.2f}" + (f"@{s}" if s else "") for n, (k, s) in kept.items()))


if __name__ == "__main__":
    main()
