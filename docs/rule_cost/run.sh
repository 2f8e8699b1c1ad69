#!/usr/bin/env bash
# What each collapse-resistant rule adds to a training step (issue 18): python -m experiments.bench --part train per row, on the
# shipped tiny base model, 8 questions x G = 8, one thread, median of 5 steps. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { name=$1; shift; OMP_NUM_THREADS=1 .venv/bin/python -m experiments.bench --part train --device cpu --repeats 5 --train-flags="$*" --out docs/rule_cost/$name.json > /dev/null 2>&1; }
run ttrl --pseudo-label majority --reward exact
run medevo --pseudo-label fpl --reward hsr
run ttrl-restrain --pseudo-label majority --reward exact --consensus-min 0.5
run medevo-restrain --pseudo-label fpl --reward hsr --consensus-min 0.5
run ttrl-empo --pseudo-label majority --reward exact --consensus-min 0.25 --low-consensus drop
run ttrl-ema --pseudo-label majority --reward exact --ema-teacher
run medevo-ema --pseudo-label fpl --reward hsr --ema-teacher
run evol-rl --pseudo-label majority --reward exact --novelty
run medevo-novelty --pseudo-label fpl --reward hsr --novelty
run entropy --pseudo-label majority --reward entropy
echo done
