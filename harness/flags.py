"""train.py's flags, in the sections `python train.py --help` shows, and every check on them.

Every knob a researcher would ablate is a flag with a default and a help text. check_args runs before any model
loads or anything is written, and names the flag that is wrong.
"""

import argparse
import math
from pathlib import Path

import torch

import data
import grpo
import model as modeling
import reward
import rollout
import rules
from models import tiny
from scale import parallel

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Med-Evo test-time self-evolution with GRPO (run under torchrun).")

    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    g.add_argument("--data-root", default=None,
                   help="dataset folder (default: datasets/<dataset> in the repo; for synthetic: artifacts/synthetic, "
                        "written on first use)")
    g.add_argument("--split", default="test", help="the unlabeled split adapted to and scored (default: test, as "
                                                   "in the paper)")
    g.add_argument("--lang", default="en", help="SLAKE language subset: en (usual protocol), zh or all")
    g.add_argument("--model", default="tiny", help="hub name or folder; 'tiny' = the shipped offline tiny base model "
                                                   "(models/tiny-base-seedS, hash-checked)")
    g.add_argument("--tiny-seed", type=int, default=None, choices=tiny.SHIPPED_SEEDS,
                   help="with --model tiny: the warm-start seed S of the shipped base model (default 0)")
    g.add_argument("--out-dir", default="runs/medevo", help="metrics.jsonl, predictions and checkpoints go here")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    g.add_argument("--overwrite", action="store_true", help="start clean in a non-empty --out-dir (deletes it)")
    g.add_argument("--seed", type=int, default=0, help="data order, sampling and initialisation seed")

    g = p.add_argument_group("the method (Med-Evo: FPL + HSR; TTRL: majority + exact)")
    g.add_argument("--pseudo-label", default="fpl", choices=rules.PSEUDO_LABELS,
                   help="FPL (Med-Evo) or majority vote (TTRL)")
    g.add_argument("--reward", default="hsr", choices=list(rules.REWARDS),
                   help="hsr (Med-Evo), exact match or token F1 vs the pseudo label; oracle = exact match vs ground "
                        "truth (upper bound, ablation only); noisy-oracle = HSR vs a label right with probability "
                        "--label-accuracy (ablation only: the break-even label accuracy); entropy = minus the answer's "
                        "mean token entropy, no label (RENT, arXiv 2505.22660); novelty = as --novelty (EVOL-RL)")
    g.add_argument("--soft-weight", type=float, default=reward.DEFAULT_SOFT_WEIGHT,
                   help="HSR: weight of the soft tier (< 1)")
    g.add_argument("--f1-weight", type=float, default=reward.DEFAULT_F1_WEIGHT,
                   help="HSR: share of token F1 (vs cosine) in the soft tier")

    g = p.add_argument_group("sampling")
    g.add_argument("--group-size", type=int, default=8, help="answers sampled per question and trained on (G)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling mass")
    g.add_argument("--max-new-tokens", type=int, default=16, help="longest answer sampled or evaluated")
    g.add_argument("--prompt-suffix", default=rollout.DEFAULT_PROMPT_SUFFIX, help="appended to every question")

    g = p.add_argument_group("optimisation (GRPO)")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: 1e-6 for a real model; 1e-4 with --model tiny, chosen on the "
                        "synthetic dev split: its ~1M weights need larger steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the unlabeled split")
    g.add_argument("--questions-per-step", type=int, default=8, help="questions per optimizer step, over all ranks")
    g.add_argument("--updates-per-rollout", type=int, default=1,
                   help="GRPO iterations on each rollout (mu); >1 makes clipping bite")
    g.add_argument("--kl-coef", type=float, default=0.04,
                   help="beta of the k3 KL to the frozen reference (0 = no reference model)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range epsilon")
    g.add_argument("--loss-agg", default="seq-mean", choices=grpo.LOSS_AGGS,
                   help="how token losses are averaged (token-mean is per rank, so with several ranks it is not "
                        "exactly the global token mean; seq-mean is exact)")
    g.add_argument("--adv-scale", default="std", choices=grpo.ADV_SCALES,
                   help="divide advantages by the group std (GRPO) or not (Dr. GRPO)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0 = run all epochs)")

    g = p.add_argument_group("evaluation, checkpoints and the collapse monitor")
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (always before and after; 0 = only those)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="questions per greedy evaluation batch")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    g.add_argument("--stop-on-collapse", action="store_true",
                   help="stop when an evaluation shows collapse (see --collapse-*), keeping the checkpoint of the "
                        "last healthy evaluation; checkpoints then follow evaluations (needs --eval-every)")
    g.add_argument("--collapse-closed-share", type=float, default=0.9,
                   help="collapse: the most frequent answer covers at least this share of the CLOSED questions")
    g.add_argument("--collapse-entropy-ratio", type=float, default=0.5,
                   help="collapse: the answers' entropy falls below this fraction of its value before training")
    g.add_argument("--collapse-image-ratio", type=float, default=0.75,
                   help="collapse: the image sensitivity falls below this fraction of its value before training "
                        "(0.75 chosen on dev, docs/collapse_rules.md; 0 = not a rule)")
    g.add_argument("--image-sensitivity", action=argparse.BooleanOptionalAction, default=True,
                   help="at every evaluation, answer again with grey images and log the share of answers that change")

    g = p.add_argument_group("scale and precision (scale/)")
    g.add_argument("--dtype", default="auto", choices=["auto", *parallel.DTYPES],
                   help="compute dtype; master weights and AdamW state are always fp32 (auto: bfloat16 on CUDA, "
                        "float32 on CPU)")
    g.add_argument("--fsdp", default="auto", choices=["auto", "on", "off"],
                   help="shard the policy with FSDP2 (auto: on with more than one process, and under torchrun with "
                        "bf16 compute, where it makes the KL to the bf16 reference exactly 0 at step 0; off keeps a "
                        "one-process run free of distributed overhead, at a KL noise floor in bf16: docs/scale.md)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for GPU, off for CPU)")
    g.add_argument("--freeze-vision", action="store_true", help="train only the language model, not the vision tower")
    g.add_argument("--offload", action="store_true",
                   help="keep fp32 masters, gradients and AdamW state in host memory (FSDP2 CPUOffloadPolicy; implies "
                        "FSDP, so run under torchrun, --nproc_per_node 1 too)")
    g.add_argument("--max-skipped-steps", type=int, default=3,
                   help="stop after this many optimizer steps in a row skipped for a non-finite gradient "
                        "(default 3)")
    g.add_argument("--dist-timeout-minutes", type=float, default=parallel.DEFAULT_TIMEOUT_MINUTES,
                   help="minutes a rank waits in a collective, e.g. while rank 0 writes the checkpoint "
                        "(33 GB for 7B; default 30)")
    modeling.add_pixel_flags(g)

    rules.add_flags(p)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.lr = args.lr if args.lr is not None else 1e-4 if args.model == "tiny" else 1e-6
    args.dtype = args.dtype if args.dtype != "auto" else "bfloat16" if cuda else "float32"
    args.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    args.label_samples = args.group_size if args.label_samples is None else args.label_samples
    return args


# ----------------------------------------------------------------------------------------------
# Checks: every flag, before any model loads or anything is written


RANGES = [  # (flag, test, what it must be)
    ("group_size", lambda v: v >= 2, "an integer >= 2 (GRPO compares answers within a group)"),
    ("temperature", lambda v: v > 0, "> 0 (sampling a group needs randomness)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("soft_weight", lambda v: 0 <= v < 1, "in [0, 1) so that exact match always scores highest"),
    ("f1_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lr", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("questions_per_step", lambda v: v >= 1, "an integer >= 1"),
    ("updates_per_rollout", lambda v: v >= 1, "an integer >= 1"),
    ("kl_coef", lambda v: v >= 0, ">= 0 (0 = no reference model)"),
    ("clip_eps", lambda v: 0 < v < 1, "in (0, 1)"),
    ("max_steps", lambda v: v >= 0, "an integer >= 0 (0 = run all epochs)"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("eval_every", lambda v: v >= 0, "an integer >= 0 (0 = only before and after)"),
    ("eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("save_every", lambda v: v >= 1, "an integer >= 1"),
    ("collapse_closed_share", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("collapse_entropy_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("collapse_image_ratio", lambda v: 0 <= v < 1, "in [0, 1) (0 = not a rule)"),
    ("max_skipped_steps", lambda v: v >= 1, "an integer >= 1"),
    ("dist_timeout_minutes", lambda v: v > 0, "> 0"),
    *rules.RANGES,
]


def check_args(args, world_size, distributed):
    """Every flag is checked here, before any model loads or anything is written."""
    for name, ok, must_be in RANGES:
        value = getattr(args, name)
        if not math.isfinite(value) or not ok(value):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {must_be}")
    rules.check(args)
    if args.stop_on_collapse and not args.eval_every:
        raise SystemExit("--stop-on-collapse reads the evaluations: give --eval-every N as well")
    if args.stop_on_collapse and args.collapse_image_ratio > 0 and not args.image_sensitivity:
        raise SystemExit("--stop-on-collapse reads the image sensitivity (--collapse-image-ratio): drop "
                         "--no-image-sensitivity, or give --collapse-image-ratio 0")
    check_scale(args, world_size, distributed)
    modeling.check_pixel_flags(args.max_pixels, args.min_pixels)
    if args.model != "tiny":
        try:
            modeling.check_model_name(args.model)
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from err
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite contradict each other: continue a run, or start it clean")
    args.data_root = str(data.resolve_root(args.dataset, args.data_root, REPO / "datasets", tiny.SYNTHETIC_DIR))


def check_scale(args, world_size, distributed):
    if args.questions_per_step % world_size:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} must be a multiple of the number of "
                         f"processes ({world_size})")
    if args.fsdp == "off" and world_size > 1:
        raise SystemExit(f"--fsdp off: {world_size} processes need FSDP2 to share the gradients (use --fsdp auto)")
    if args.fsdp == "on" and not distributed:
        raise SystemExit("--fsdp on needs a process group: run under torchrun (--nproc_per_node 1 is fine)")
    if args.offload and (args.fsdp == "off" or not distributed):
        raise SystemExit("--offload is FSDP2's offload: run under torchrun (--nproc_per_node 1 is fine), "
                         "not --fsdp off")


def run_flags(args):
    """The flags that define a run (all of them; checkpoint.RESUME_MAY_CHANGE says which may change)."""
    return {k: v for k, v in vars(args).items() if k != "out_dir"}
