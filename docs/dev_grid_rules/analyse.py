"""What the dev-grid logs of issue 18's rows say, per run and epoch, from their metrics.jsonl.

    python docs/dev_grid_rules/analyse.py [RUNS_DIR]     # default: docs/dev_grid_rules/runs/base0-rl0

One line per (run, epoch): the dev score and its change since step 0; the means over the epoch's steps of
the label's hit rate (on all groups and on contested ones, minus the greedy answer's there: where the
gradient flows, is the label better than what the model already says?), consensus (the label's vote share),
untrusted (the share of groups below --consensus-min: RESTRAIN's penalty / EMPO's drop), the mean reward;
and the image sensitivity at the epoch's end as a share of its step-0 value.
"""
import json
import statistics
import sys
from pathlib import Path

EPOCH = 143  # steps an epoch on dev (1144 questions / 8)
COLUMNS = ["run", "epoch", "dev", "change", "hit", "contested hit - greedy", "consensus", "untrusted", "reward",
           "image sens. / step 0"]


def epoch_mean(steps, key):
    """The mean of a logged value over an epoch's steps; None when the row does not log it."""
    values = [s[key] for s in steps if s.get(key) is not None]
    return statistics.mean(values) if values else None


def pct(value, sign=""):
    return "–" if value is None else f"{100 * value:{sign}.1f}"


def run_lines(name, rows):
    evals = {r["step"]: r for r in rows if "eval" in r}
    steps = [r for r in rows if "eval" not in r]
    start = evals[0]
    for end in sorted(evals)[1:]:
        epoch = [s for s in steps if end - EPOCH < s["step"] <= end]
        hit, greedy = epoch_mean(epoch, "contested_hit_rate"), epoch_mean(epoch, "contested_greedy_rate")
        yield [name, str(end // EPOCH), f"{100 * evals[end]['overall']:.2f}",
               f"{100 * (evals[end]['overall'] - start['overall']):+.2f}",
               pct(epoch_mean(epoch, "hit_rate")), pct(None if hit is None else hit - greedy, "+"),
               pct(epoch_mean(epoch, "consensus")), pct(epoch_mean(epoch, "untrusted")),
               f"{epoch_mean(epoch, 'reward'):.3f}",
               f"{evals[end]['image_sensitivity'] / start['image_sensitivity']:.2f}"]


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "runs" / "base0-rl0")
    lines = []
    for run in sorted(root.glob("*-lr*")):
        metrics = run / "metrics.jsonl"
        if run.is_dir() and (run / "wall_seconds.json").exists():  # finished runs only
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            lines += run_lines(run.name, rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for line in lines:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
