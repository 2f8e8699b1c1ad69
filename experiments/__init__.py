"""Experiments: the ablation runner (ablate) and the benchmarks (bench). Run them as modules from the repository
root: `python -m experiments.ablate ...`, `python -m experiments.bench ...`."""
