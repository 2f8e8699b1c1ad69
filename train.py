"""Med-Evo: test-time self-evolution of a medical VLM on an unlabeled split, with GRPO.

The whole method, one step at a time (arXiv 2603.07443):
  1. rollout   - the policy samples G answers for each unlabeled question (rollout.py)
  2. forward   - one teacher-forced pass gives the answers' log-probs AND their last-layer hidden
                 states (rollout.completion_logits_and_hidden): FPL costs no extra forward pass
  3. FPL       - the pseudo label of a group is the answer nearest its embedding centroid (centroid.py)
  4. HSR       - each answer is rewarded against the pseudo label: exact match on top, a soft
                 token-F1 + cosine score below it (reward.py)
  5. GRPO      - group-normalised advantages, clipped ratio, k3 KL to the frozen reference (grpo.py)

With --label-samples N > G the pseudo label is chosen from N samples and GRPO trains on G of them.
The collapse-resistant rules of issue 18, each off by default: --consensus-min / --low-consensus (RESTRAIN,
EMPO: grpo.py), --novelty (EVOL-RL) and --reward entropy (RENT) (reward.py), --ema-teacher (Co-rewarding-II:
centroid.teacher_labels, model.ema_update).
Nothing here reads a label, so nothing shows accuracy falling; the collapse monitor (monitor.py:
consensus per step; per evaluation the top CLOSED answer's share, the answers' entropy and the image
sensitivity; --stop-on-collapse) is what a user adapting on truly unlabeled data can watch.

By default the split adapted to is the *test* split, as in the paper: adapt on the unlabeled test
questions, then score the same questions. Ground-truth answers are never read for training: they
are read only by evaluation and by logged diagnostics (the pseudo-label hit rate and the label
quality where the gradient flows, monitor.py), and by the `--reward oracle` / `noisy-oracle`
ablations, which say so.

    torchrun --nproc_per_node 1 train.py --dataset synthetic                       # offline, CPU
    torchrun --nproc_per_node 8 train.py --dataset slake --model Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...

Scale and precision (parallel.py): the policy's master weights, gradients and AdamW state are fp32;
`--dtype bfloat16` (the GPU default) computes in bf16 over them. With more than one process the
policy is sharded with FSDP2 (each decoder layer, each vision block, then the rest) and FSDP
reduces the gradients; each rank takes a disjoint shard of every global batch. The frozen reference
is held whole on every rank, in the compute dtype. Checkpoints (checkpoint.py) are plain
`save_pretrained` folders of the fp32 weights plus each rank's optimizer shard, written atomically;
`--resume` continues a killed run exactly, or refuses. SIGTERM / Ctrl-C finish the current step,
write a checkpoint and exit 0.
"""

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import centroid
from scale import checkpoint
import data
import evaluate
import grpo
from scale import memory
import model as modeling
import monitor
from scale import parallel
import reward
import rollout
from models import tiny

REPO = Path(__file__).resolve().parent
# ----------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Med-Evo test-time self-evolution with GRPO (run under torchrun).")
    # data, model, run folder
    p.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: datasets/<dataset> in the repo; for synthetic: artifacts/synthetic, "
                        "written on first use)")
    p.add_argument("--split", default="test", help="the unlabeled split adapted to and scored (default: test, as "
                                                   "in the paper)")
    p.add_argument("--lang", default="en", help="SLAKE language subset: en (usual protocol), zh or all")
    p.add_argument("--model", default="tiny", help="hub name or folder; 'tiny' = the shipped offline tiny base model "
                                                   "(models/tiny-base-seedS, hash-checked)")
    p.add_argument("--tiny-seed", type=int, default=None, choices=tiny.SHIPPED_SEEDS,
                   help="with --model tiny: the warm-start seed S of the shipped base model (default 0)")
    p.add_argument("--out-dir", default="runs/medevo", help="metrics.jsonl, predictions and checkpoints go here")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    p.add_argument("--overwrite", action="store_true", help="start clean in a non-empty --out-dir (deletes it)")
    # the method
    p.add_argument("--pseudo-label", default="fpl", choices=centroid.PSEUDO_LABELS,
                   help="FPL (Med-Evo) or majority vote (TTRL)")
    p.add_argument("--reward", default="hsr", choices=reward.REWARD_KINDS,
                   help="hsr (Med-Evo), exact match or token F1 vs the pseudo label; oracle = exact match vs ground "
                        "truth (upper bound, ablation only); noisy-oracle = HSR vs a label right with probability "
                        "--label-accuracy (ablation only: the break-even label accuracy); entropy = minus the answer's "
                        "mean token entropy, no label (RENT, arXiv 2505.22660)")
    p.add_argument("--label-accuracy", type=float, default=1.0,
                   help="noisy-oracle: probability that a question's label is the truth (else the group's most "
                        "frequent wrong answer)")
    p.add_argument("--soft-weight", type=float, default=reward.DEFAULT_SOFT_WEIGHT,
                   help="HSR: weight of the soft tier (< 1)")
    p.add_argument("--f1-weight", type=float, default=reward.DEFAULT_F1_WEIGHT,
                   help="HSR: share of token F1 (vs cosine) in the soft tier")
    # collapse-resistant rules from the literature (issue 18); each is off by default
    p.add_argument("--consensus-min", type=float, default=0.0,
                   help="kappa: a group whose pseudo label holds a vote share below it is untrusted (RESTRAIN, "
                        "arXiv 2510.02172; EMPO, 2504.05812); 0 = off. RESTRAIN's own kappa was not reachable to us "
                        "(grpo.py); the ablation rows use 0.5")
    p.add_argument("--low-consensus", default="penalize", choices=grpo.LOW_CONSENSUS_RULES,
                   help="an untrusted group: penalize = rewards 0 and advantages -delta (RESTRAIN), drop = no "
                        "gradient (EMPO)")
    p.add_argument("--penalty-delta", type=float, default=grpo.DEFAULT_PENALTY_DELTA,
                   help="delta of --low-consensus penalize (RESTRAIN's value was not reachable to us; 0.1)")
    p.add_argument("--novelty", action="store_true",
                   help="EVOL-RL (arXiv 2509.15194) novelty shaping: REPLACES the reward with 0.5 + 0.5 * novelty "
                        "for answers equal to the label and -1 + 0.5 * novelty for the others (reward.py)")
    p.add_argument("--ema-teacher", action="store_true",
                   help="Co-rewarding-II (arXiv 2508.00410): the pseudo label comes from an EMA copy of the policy, "
                        "by majority vote or FPL over its own N samples (model.py); fp32, sharded like the policy")
    p.add_argument("--ema-start", type=float, default=modeling.DEFAULT_EMA_START,
                   help="the teacher's EMA decay at the start (Co-rewarding-II: 0.99)")
    p.add_argument("--ema-end", type=float, default=modeling.DEFAULT_EMA_END,
                   help="the teacher's EMA decay at the last step, reached by a cosine (Co-rewarding-II: 0.9999)")
    # sampling
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per question and trained on (G)")
    p.add_argument("--label-samples", type=int, default=None,
                   help="answers sampled per question to choose the pseudo label from (N >= G; default G): majority "
                        "vote or FPL over all N, GRPO on the first G (TTRL votes on 64, trains on 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer sampled or evaluated")
    p.add_argument("--prompt-suffix", default=rollout.DEFAULT_PROMPT_SUFFIX, help="appended to every question")
    # optimisation
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: 1e-6 for a real model; 1e-4 with --model tiny, chosen on the "
                        "synthetic dev split: its ~1M weights need larger steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the unlabeled split")
    p.add_argument("--questions-per-step", type=int, default=8, help="questions per optimizer step, over all ranks")
    p.add_argument("--updates-per-rollout", type=int, default=1,
                   help="GRPO iterations on each rollout (mu); >1 makes clipping bite")
    p.add_argument("--kl-coef", type=float, default=0.04,
                   help="beta of the k3 KL to the frozen reference (0 = no reference model)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range epsilon")
    p.add_argument("--loss-agg", default="seq-mean", choices=grpo.LOSS_AGGS,
                   help="how token losses are averaged (token-mean is per rank, so with several ranks it is not "
                        "exactly the global token mean; seq-mean is exact)")
    p.add_argument("--adv-scale", default="std", choices=grpo.ADV_SCALES,
                   help="divide advantages by the group std (GRPO) or not (Dr. GRPO)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0 = run all epochs)")
    p.add_argument("--seed", type=int, default=0, help="data order, sampling and initialisation seed")
    # evaluation, checkpoints, hardware
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (always before and after; 0 = only those)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="questions per greedy evaluation batch")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    p.add_argument("--stop-on-collapse", action="store_true",
                   help="stop when an evaluation shows collapse (see --collapse-*), keeping the checkpoint of the "
                        "last healthy evaluation; checkpoints then follow evaluations (needs --eval-every)")
    p.add_argument("--collapse-closed-share", type=float, default=0.9,
                   help="collapse: the most frequent answer covers at least this share of the CLOSED questions")
    p.add_argument("--collapse-entropy-ratio", type=float, default=0.5,
                   help="collapse: the answers' entropy falls below this fraction of its value before training")
    p.add_argument("--collapse-image-ratio", type=float, default=0.75,
                   help="collapse: the image sensitivity falls below this fraction of its value before training "
                        "(0.75 chosen on dev, README; 0 = not a rule)")
    p.add_argument("--image-sensitivity", action=argparse.BooleanOptionalAction, default=True,
                   help="at every evaluation, answer again with grey images and log the share of answers that change")
    p.add_argument("--dtype", default="auto", choices=["auto", *parallel.DTYPES],
                   help="compute dtype; master weights and AdamW state are always fp32 (auto: bfloat16 on CUDA, "
                        "float32 on CPU)")
    p.add_argument("--fsdp", default="auto", choices=["auto", "on", "off"],
                   help="shard the policy with FSDP2 (auto: on with more than one process; off keeps a "
                        "one-process run free of distributed overhead)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for GPU, off for CPU)")
    p.add_argument("--freeze-vision", action="store_true", help="train only the language model, not the vision tower")
    p.add_argument("--offload", action="store_true",
                   help="keep fp32 masters, gradients and AdamW state in host memory (FSDP2 CPUOffloadPolicy; implies "
                        "FSDP, so run under torchrun, --nproc_per_node 1 too)")
    p.add_argument("--max-skipped-steps", type=int, default=3,
                   help="stop after this many optimizer steps in a row skipped for a non-finite gradient "
                        "(default 3)")
    p.add_argument("--dist-timeout-minutes", type=float, default=parallel.DEFAULT_TIMEOUT_MINUTES,
                   help="minutes a rank waits in a collective, e.g. while rank 0 writes the checkpoint "
                        "(33 GB for 7B; default 30)")
    modeling.add_pixel_flags(p)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.lr = args.lr if args.lr is not None else 1e-4 if args.model == "tiny" else 1e-6
    args.dtype = args.dtype if args.dtype != "auto" else "bfloat16" if cuda else "float32"
    args.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    args.label_samples = args.group_size if args.label_samples is None else args.label_samples
    return args


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
    ("label_accuracy", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("consensus_min", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    ("penalty_delta", lambda v: v >= 0, ">= 0"),
    ("ema_start", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema_end", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("max_skipped_steps", lambda v: v >= 1, "an integer >= 1"),
    ("dist_timeout_minutes", lambda v: v > 0, "> 0"),
]


def check_args(args, world_size, distributed):
    """Every flag is checked here, before any model loads or anything is written."""
    for name, ok, must_be in RANGES:
        value = getattr(args, name)
        if not math.isfinite(value) or not ok(value):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {must_be}")
    if args.label_samples < args.group_size:
        raise SystemExit(f"--label-samples {args.label_samples}: must be >= --group-size ({args.group_size}); the "
                         f"pseudo label is chosen from N samples, G of which are trained on")
    if args.novelty and args.reward in ("entropy", "oracle", "noisy-oracle"):
        raise SystemExit(f"--novelty replaces the reward against the pseudo label: it cannot shape --reward "
                         f"{args.reward} (use exact or hsr)")
    if args.ema_teacher and args.reward in ("entropy", "oracle", "noisy-oracle"):
        raise SystemExit(f"--ema-teacher gives the pseudo label, which --reward {args.reward} does not use")
    if args.ema_teacher and args.offload:
        raise SystemExit("--ema-teacher with --offload: the teacher is sharded on the device, the policy's "
                         "masters in host memory; drop --offload")
    if args.stop_on_collapse and not args.eval_every:
        raise SystemExit("--stop-on-collapse reads the evaluations: give --eval-every N as well")
    if args.stop_on_collapse and args.collapse_image_ratio > 0 and not args.image_sensitivity:
        raise SystemExit("--stop-on-collapse reads the image sensitivity (--collapse-image-ratio): drop "
                         "--no-image-sensitivity, or give --collapse-image-ratio 0")
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
    modeling.check_pixel_flags(args.max_pixels, args.min_pixels)
    if args.model != "tiny":
        try:
            modeling.check_model_name(args.model)
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from err
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite contradict each other: continue a run, or start it clean")
    args.data_root = str(data.resolve_root(args.dataset, args.data_root, REPO / "datasets",
                                           tiny.SYNTHETIC_DIR))


def run_flags(args):
    """The flags that define a run (all of them; checkpoint.RESUME_MAY_CHANGE says which may change)."""
    return {k: v for k, v in vars(args).items() if k != "out_dir"}


# ----------------------------------------------------------------------------------------------
# Data order: a fixed shuffle per epoch, the same on every rank, so a resumed run sees the same batches


def batch_for_step(records, step, questions_per_step, seed):
    """The global batch of question indices of one step (epochs wrap around)."""
    steps_per_epoch = len(records) // questions_per_step
    epoch, within = divmod(step, steps_per_epoch)
    order = list(range(len(records)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order[within * questions_per_step : (within + 1) * questions_per_step]


def shard(items, rank, world_size):
    """This rank's contiguous share of a global batch."""
    per_rank = len(items) // world_size
    return items[rank * per_rank : (rank + 1) * per_rank]


# ----------------------------------------------------------------------------------------------
# One GRPO step


@dataclass
class RolloutScores:
    """What the first update on a rollout computes and later updates (--updates-per-rollout > 1) reuse."""
    old_logp: torch.Tensor  # [B*G, T] log-probs of the trained answers under the sampling policy
    ref_logp: torch.Tensor | None  # [B*G, T] log-probs under the frozen reference (None when --kl-coef 0)
    rewards: torch.Tensor  # [B*G]
    labels: torch.Tensor  # [B] index of each question's pseudo label among its N label samples
    label_texts: list  # [B] the labels rewarded against (the pseudo labels' texts, or noisy-oracle labels)
    advantages: torch.Tensor  # [B*G]
    keep: torch.Tensor | None  # [B*G] bool, False on a dropped low-consensus group's rows (--low-consensus drop)
    consensus: float  # share of the label samples equal to their pseudo label (TTRL's majority ratio)
    untrusted: float  # share of the groups whose label's vote share is below --consensus-min


def clock(device):
    """Wall time after the device's queued work is done, so per-stage timings are honest on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def rewards_for_rollout(hidden, out, group_size, args, refs=None):
    """FPL or majority pseudo labels, then rewards: returns (rewards [N], labels [N // G], label texts [N // G]).
    --reward entropy: rewards None (they come from the logits, not from a label)."""
    emb = centroid.answer_embeddings(hidden.detach().float(), out.completion_mask)  # [N, D]
    labels = centroid.pseudo_labels(args.pseudo_label, emb, out.texts, group_size)  # [B]
    if args.reward == "noisy-oracle" or args.ema_teacher:  # refs: labels from outside, which replace the pseudo labels
        label_texts, cos = refs, centroid.cosine_to_label_texts(emb, out.texts, group_size, refs)
    else:
        label_texts = centroid.label_texts(out.texts, group_size, labels)
        cos = centroid.cosine_to_pseudo_label(emb, group_size, labels)  # [N]
    if args.reward == "entropy" or args.novelty:
        rewards = reward.novelty_rewards(emb, out.texts, group_size, label_texts) if args.novelty else None
        return rewards, labels, label_texts
    rewards = reward.compute_rewards(out.texts, group_size, labels, cos, kind=args.reward, refs=refs,
                                     soft_weight=args.soft_weight, f1_weight=args.f1_weight)
    return rewards, labels, label_texts


def teacher_forced(model, prompt, out, group_size, dtype):
    """Logits [N, T, V] (fp32) and hidden states [N, T, D] (compute dtype) of the sampled answers."""
    with parallel.compute_precision(model, dtype):  # sharded: the whole pass is one registered FSDP forward
        return parallel.as_forward(model, rollout.completion_logits_and_hidden, prompt, out.completion_ids,
                                   out.completion_mask, group_size)


def label_hidden(policy, prompt, out, hidden, group_size, args):
    """Hidden states of all N label samples [B*N, T, D]: the trained rows' from the policy forward, the
    other N - G rows' from one more forward without gradient (the only extra cost of --label-samples)."""
    N, G = args.label_samples, group_size
    if N == G:
        return hidden
    rows = [r for r in range(out.completion_ids.shape[0]) if r % N >= G]
    with torch.no_grad():
        _, extra = teacher_forced(policy, prompt, select_rows(out, rows), N - G, parallel.DTYPES[args.dtype])
    B, T = out.completion_ids.shape[0] // N, hidden.shape[1]
    return torch.cat([hidden.detach().view(B, G, T, -1), extra.view(B, N - G, T, -1)], dim=1).flatten(0, 1)


def score_rollout(policy, logp, hidden, reference, prompt, out, group_size, args, refs, timings, entropy=None):
    """The first update's view of a fresh rollout: pseudo labels (over all N label samples in `out`), rewards
    and advantages (of the G trained answers, the first G of each question), reference log-probs.
    entropy [B*G]: --reward entropy's rewards (reward.entropy_rewards of the first update's logits)."""
    N, G = args.label_samples, group_size
    t_label = clock(logp.device)
    hidden_all = label_hidden(policy, prompt, out, hidden, G, args)  # [B*N, T, D]
    t0 = clock(logp.device)
    if N > G:  # the no-grad forward over the N - G extra label samples: not part of FPL + HSR's time
        add_time(timings, "label_forward", t0 - t_label)
    rewards_all, labels, label_texts = rewards_for_rollout(hidden_all, out, N, args, refs)  # [B*N], [B], [B]
    rewards = entropy if rewards_all is None else rewards_all.view(-1, N)[:, :G].reshape(-1)  # [B*G]
    shares = centroid.label_shares(out.texts, N, label_texts)  # [B] the labels' vote shares over N
    rewards, advantages, keep = grpo.low_consensus_rule(rewards.to(logp.device), shares, G, args.consensus_min,
                                                        args.low_consensus, args.penalty_delta, args.adv_scale)
    consensus = sum(shares) / len(shares)  # TTRL's majority ratio, for a majority label
    untrusted = sum(share < args.consensus_min for share in shares) / len(shares)
    t1 = clock(logp.device)
    ref_logp = None
    if args.kl_coef > 0:
        with torch.no_grad():
            trained = first_of_each_group(out, N, G)
            ref_logits, _ = teacher_forced(reference, prompt, trained, G, parallel.DTYPES[args.dtype])
            ref_logp = grpo.token_logprobs(ref_logits, trained.completion_ids)
    add_time(timings, "fpl_hsr", t1 - t0)
    add_time(timings, "reference_forward", clock(logp.device) - t1)
    return RolloutScores(logp.detach(), ref_logp, rewards, labels, label_texts, advantages, keep, consensus,
                         untrusted)


def select_rows(out, rows):
    """The sub-rollout of the given answer rows."""
    return rollout.Rollout(out.completion_ids[rows], out.completion_mask[rows], [out.texts[r] for r in rows])


def first_of_each_group(out, label_samples, group_size):
    """The G answers of each question that GRPO trains on: the first G of its N label samples."""
    if label_samples == group_size:
        return out
    return select_rows(out, [r for r in range(len(out.texts)) if r % label_samples < group_size])


def add_time(timings, name, seconds):
    timings[name] = timings.get(name, 0.0) + seconds


def policy_loss(policy, reference, prompt, out, group_size, args, refs=None, timings=None, scores=None):
    """Everything between the rollout and backward: log-probs, FPL, HSR, advantages, GRPO loss.

    The first update on a rollout computes its RolloutScores and returns them; later updates pass
    them back in, so that the ratio is taken against the policy that sampled the answers.
    Returns (loss, stats, scores).
    """
    timings = {} if timings is None else timings
    trained = first_of_each_group(out, args.label_samples, group_size)  # out holds N label samples per question
    t0 = clock(policy.device)
    logits, hidden = teacher_forced(policy, prompt, trained, group_size, parallel.DTYPES[args.dtype])
    logp = grpo.token_logprobs(logits, trained.completion_ids)  # [B*G, T] float32
    first_entropy = scores is None and args.reward == "entropy"  # RENT: the sampling policy's logits, detached
    entropy = reward.entropy_rewards(logits, trained.completion_mask) if first_entropy else None
    del logits
    add_time(timings, "policy_forward", clock(policy.device) - t0)
    if scores is None:
        scores = score_rollout(policy, logp, hidden, reference, prompt, out, group_size, args, refs, timings, entropy)
    mask = trained.completion_mask.to(logp.dtype)
    loss, stats = grpo.grpo_loss(logp, scores.old_logp, scores.ref_logp, scores.advantages, mask,
                                 clip_eps=args.clip_eps, kl_coef=args.kl_coef, agg=args.loss_agg, keep=scores.keep)
    return loss, {k: float(v) for k, v in stats.items()}, scores


def train_step(policy, reference, optimizer, tokenizer, image_processor, records, answers, args, generator,
               greedy_right=None, teacher=None):
    """Rollout -> policy forward -> FPL -> HSR -> advantages -> GRPO loss -> backward (FSDP reduces) -> AdamW.

    answers and greedy_right (was the greedy answer right at the last evaluation) feed diagnostics only,
    and the oracle ablations' rewards; the label-free methods never read them.
    """
    G, N, dtype = args.group_size, args.label_samples, parallel.DTYPES[args.dtype]
    timings = {}
    t0 = clock(policy.device)
    prompt = rollout.build_inputs(tokenizer, image_processor, records, args.prompt_suffix, policy.device)
    policy.eval()  # sampling needs the KV cache, which gradient checkpointing turns off in train mode
    with parallel.gathered(policy, dtype):
        out = rollout.sample(policy, tokenizer, prompt, N, args.max_new_tokens, args.temperature, args.top_p,
                             generator)  # N >= G answers per question
    timings["rollout"] = clock(policy.device) - t0
    policy.train()
    # the oracle ablations read labels (noisy-oracle: its draws come from this rank's sampler RNG); Med-Evo never does
    refs = centroid.oracle_targets(args.reward, answers, out.texts, N, args.label_accuracy, generator)
    if teacher is not None:  # --ema-teacher: the label comes from the teacher's own samples
        t_teacher = clock(policy.device)
        refs = centroid.teacher_labels(teacher, tokenizer, prompt, args.pseudo_label, N, dtype, generator,
                                       args.max_new_tokens, args.temperature, args.top_p)
        timings["teacher"] = clock(policy.device) - t_teacher
    scores = None
    for update in range(args.updates_per_rollout):
        loss, update_stats, scores = policy_loss(policy, reference, prompt, out, G, args, refs, timings, scores)
        if update == 0:
            stats = update_stats  # log the first update's view of the fresh rollout
        t_backward = clock(policy.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"], finite = parallel.clip_gradients(policy, args.grad_clip)  # finite on every rank?
        if finite:
            optimizer.step()
        else:  # a NaN / inf gradient on any rank: every rank skips this update, weights and AdamW state unchanged
            stats["skipped"] = "non-finite gradient"
        add_time(timings, "backward_and_step", clock(policy.device) - t_backward)
    trained, hits = first_of_each_group(out, N, G), evaluate.fully_right(scores.label_texts, records, answers)
    stats.update(
        reward=float(scores.rewards.mean()),
        consensus=scores.consensus,
        untrusted=scores.untrusted,
        answer_length=float(trained.completion_mask.sum(1).float().mean()),
        hit_rate=float("nan") if hits is None else sum(hits) / len(hits),
        **monitor.label_quality_counts(scores.rewards, G, trained.texts, scores.label_texts, answers, hits,
                                       greedy_right or [None] * len(records)),
        **{f"seconds_{k}": v for k, v in timings.items()},
    )
    return stats


# ----------------------------------------------------------------------------------------------
# Setup: everything that can fail on bad input runs on rank 0 before any model loads


def on_rank0(fn, *fn_args):
    """fn(*fn_args) on rank 0; every rank gets its result, or exits with the same message."""
    result, error = None, None
    if parallel.is_rank0():
        try:
            result = fn(*fn_args)
        except (SystemExit, OSError, ValueError) as err:
            error = str(err) or repr(err)
    result, error = parallel.broadcast_from_rank0((result, error))
    if error is not None:
        raise SystemExit(error)
    return result


def load_data(args):
    """The split (answers kept for evaluation only), after checking that every image opens."""
    if args.dataset == "synthetic" and Path(args.data_root) == tiny.SYNTHETIC_DIR:
        tiny.ensure_synthetic(args.data_root)
    labelled = data.load_split(args.dataset, args.data_root, args.split, lang=args.lang)
    data.check_images_open(labelled, f"{args.dataset}/{args.split}")
    if args.reward in ("oracle", "noisy-oracle") and any(r["answer"] is None for r in labelled):
        raise SystemExit(f"--reward {args.reward} reads the answers, but {args.dataset}/{args.split} has unlabelled "
                         f"questions: use a label-free reward (hsr, exact, f1)")
    if len(labelled) < args.questions_per_step:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} exceeds the split's {len(labelled)} "
                         f"questions")
    return labelled


def prepare_policy(policy, args, device, sharded=False):
    """Freeze the vision tower, gradient checkpointing and FSDP2 as the flags say; return AdamW (fp32 state)."""
    prepare_modules(policy, args)
    if sharded:
        parallel.shard_policy(policy, parallel.DTYPES[args.dtype], args.offload, device)
    return adamw(policy, args)


def prepare_modules(policy, args):
    if args.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def adamw(policy, args):
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=args.weight_decay)


@dataclass
class Run:
    """Everything the training loop and the evaluations share."""
    args: argparse.Namespace
    policy: torch.nn.Module  # fp32 master weights (FSDP2 shards when sharded)
    reference: torch.nn.Module | None  # frozen, in the compute dtype; None when --kl-coef 0
    tokenizer: object
    image_processor: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this rank's sampler RNG
    labelled: list  # the split's records, answers included (evaluation and diagnostics only)
    rank: int
    world_size: int
    out_dir: Path
    baseline: dict | None = None  # the evaluation before training: the collapse monitor compares with it
    last_right: dict | None = None  # {qid: greedy answer fully right} at the last evaluation (diagnostics)
    saved_step: int | None = None  # the step of the newest checkpoint written by this process
    teacher: torch.nn.Module | None = None  # --ema-teacher: the EMA copy of the policy (fp32, frozen)


def load_run(args, model_name, labelled, device, rank, world_size, sharded):
    """Policy (fp32), reference (compute dtype), optimizer; restored from the checkpoint on --resume.

    Sharded, rank 0 alone reads the weights and sends each rank its shards (parallel.load_sharded)."""
    start_from = Path(args.out_dir) / "checkpoint" if args.resume else model_name
    dtype, reference_from = parallel.DTYPES[args.dtype], model_name if args.kl_coef > 0 else None
    if sharded:
        policy, reference, tokenizer, image_processor = parallel.load_sharded(
            start_from, reference_from, device, dtype, args.offload,
            prepare=lambda model: prepare_modules(model, args))
    else:
        policy, tokenizer, image_processor = modeling.load(start_from, device, dtype=torch.float32)
        prepare_modules(policy, args)
        reference = None if reference_from is None else modeling.load_model(reference_from, device, dtype).eval()
    images = modeling.apply_pixel_flags(image_processor, args.max_pixels, args.min_pixels, labelled)
    longest, image = modeling.longest_prompt(tokenizer, image_processor, labelled, args.prompt_suffix)
    parallel.print0(images + "\n" + memory.run_plan(policy, args, world_size, sharded, reference is not None,
                                                    longest, image))
    optimizer = adamw(policy, args)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    torch.manual_seed(args.seed)
    run = Run(args, policy, reference, tokenizer, image_processor, optimizer, generator, labelled, rank, world_size,
              Path(args.out_dir))
    if args.ema_teacher:  # the start model, or on --resume the checkpoint's teacher.pt; sharded like the policy
        state_file = run.out_dir / "checkpoint" / "teacher.pt" if args.resume else None
        run.teacher = (parallel.load_sharded_teacher(model_name, device, dtype, state_file) if sharded
                       else modeling.load_teacher(model_name, device, state_file))
    step = 0
    if args.resume:
        step = checkpoint.load_trainer_state(run.out_dir, policy, optimizer, generator, rank, args.lr)
    return run, step


def evaluation_due(step, args, total_steps):
    """--eval-every's evaluations between steps (the final one always runs)."""
    return args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps


# ----------------------------------------------------------------------------------------------
# Main loop


def record(run, row):
    if run.rank == 0:
        checkpoint.append_row(run.out_dir / "metrics.jsonl", row)


def run_eval(run, step, tag):
    scores, right = evaluate.evaluate_split(run.policy, run.tokenizer, run.image_processor, run.labelled, run.args,
                                            run.rank, run.world_size, tag, run.out_dir)
    if run.last_right is not None:
        scores.update(monitor.flips(run.last_right, right))
    run.last_right = right
    parallel.print0(f"eval {tag}\n" + evaluate.format_table(scores) + "\n" + monitor.format_monitor(scores))
    record(run, {"step": step, "eval": tag, **scores})
    return scores


def save(run, step):
    checkpoint.save(run.out_dir, run.policy, run.tokenizer, run.image_processor, run.optimizer, step,
                    run_flags(run.args), run.generator, run.teacher)
    run.saved_step = step


def train_loop(run, step, total_steps):
    """GRPO steps until total_steps, a SIGTERM / SIGINT, --max-skipped-steps non-finite gradients in a row,
    or (--stop-on-collapse) a collapse.

    Returns (step, why it stopped early or None). With --stop-on-collapse, checkpoints are written after
    healthy evaluations only, so the checkpoint left behind is the last one before the collapse.
    """
    args = run.args
    answers_by_qid = {r["qid"]: r["answer"] for r in run.labelled}  # diagnostics and the oracle ablation only
    unlabeled = [dict(r, answer=None) for r in run.labelled]  # what training sees
    if args.resume and evaluation_due(step, args, total_steps):  # a SIGTERM may have skipped it
        run_eval(run, step, f"step{step}")
    t_start, first_step, skipped = time.time(), step, 0
    with parallel.stop_on_signal() as received:
        while step < total_steps:
            t0 = time.time()
            global_batch = batch_for_step(unlabeled, step, args.questions_per_step, args.seed)
            records = [unlabeled[i] for i in shard(global_batch, run.rank, run.world_size)]
            stats = train_step(run.policy, run.reference, run.optimizer, run.tokenizer, run.image_processor,
                               records, [answers_by_qid[r["qid"]] for r in records], args, run.generator,
                               [(run.last_right or {}).get(r["qid"]) for r in records], run.teacher)
            step += 1
            if run.teacher is not None:  # Co-rewarding-II: teacher <- a * teacher + (1 - a) * policy
                modeling.ema_update(run.teacher, run.policy,
                                    modeling.ema_decay(step, total_steps, args.ema_start, args.ema_end))
            stats = dict(monitor.label_quality(parallel.mean_over_ranks(stats)), seconds_step=time.time() - t0)
            eta = (time.time() - t_start) / (step - first_step) * (total_steps - step)
            parallel.print0(monitor.format_step(step, total_steps, stats, eta), flush=True)
            record(run, {"step": step, "questions": [unlabeled[i]["qid"] for i in global_batch], **stats})
            skipped = skipped + 1 if "skipped" in stats else 0  # the same on every rank
            if skipped >= args.max_skipped_steps:
                return step, f"non-finite gradients: {skipped} steps in a row skipped"
            stopping = parallel.any_rank(received)
            if stopping or (not args.stop_on_collapse and (step % args.save_every == 0 or step == total_steps)):
                save(run, step)
            if stopping:
                return step, received[0] if received else "a signal to another rank"
            if evaluation_due(step, args, total_steps):
                scores = run_eval(run, step, f"step{step}")
                reason = monitor.collapse_reason(scores, run.baseline, args) if args.stop_on_collapse else None
                if reason:
                    return step, f"collapse: {reason}"
                if args.stop_on_collapse:
                    save(run, step)
    return step, None


def report_stop(run, step, total_steps, stopped_by):
    if stopped_by.startswith("collapse"):
        kept = f"step {run.saved_step}" if run.saved_step is not None else "none (the base model was the last healthy)"
        parallel.print0(f"stopped at step {step}/{total_steps} by a {stopped_by}; checkpoint kept from the last "
                        f"healthy evaluation: {kept}, in {run.out_dir / 'checkpoint'}", flush=True)
    elif stopped_by.startswith("non-finite"):
        parallel.print0(f"stopped at step {step}/{total_steps} by {stopped_by} (--max-skipped-steps "
                        f"{run.args.max_skipped_steps}); last good checkpoint: "
                        f"{checkpoint.describe_newest(run.out_dir)}", flush=True)
    else:
        parallel.print0(f"stopped by {stopped_by} after step {step}/{total_steps}: checkpoint in "
                        f"{run.out_dir / 'checkpoint'}; continue with the same command and --resume", flush=True)


def main(argv=None):
    modeling.disable_cudnn_attention()  # on CUDA: cuDNN SDPA's backward gives NaN gradients with our masks
    args = parse_args(argv)
    rank, world_size, device = parallel.setup_distributed(modeling.default_device(), args.dist_timeout_minutes,
                                                          cpu_collectives=args.offload)
    sharded = args.offload or args.fsdp == "on" or (args.fsdp == "auto" and world_size > 1)
    check_args(args, world_size, distributed=parallel.dist.is_initialized())
    labelled = on_rank0(load_data, args)  # every image opens, before any model loads
    notes = on_rank0(checkpoint.prepare_out_dir, args.out_dir, args.resume, args.overwrite, world_size,
                     run_flags(args))
    checkpoint.check_shared_out_dir(args.out_dir)  # every rank writes its optimizer shard there
    model_name = on_rank0(tiny.resolve_model, args.model, args.tiny_seed)  # hash-checks the shipped tiny model
    run, step = load_run(args, model_name, labelled, device, rank, world_size, sharded)
    steps = len(labelled) // args.questions_per_step * args.epochs
    total_steps = min(steps, args.max_steps) if args.max_steps else steps
    parallel.print0("\n".join(notes + [
        f"Med-Evo | {args.dataset}/{args.split}: {len(labelled)} questions | model {model_name} | {world_size} "
        f"process(es) on {device}, {args.dtype} compute, fp32 masters{', FSDP2' if sharded else ''} | "
        f"{total_steps} steps of {args.questions_per_step} questions x G={args.group_size} | pseudo-label "
        f"{args.pseudo_label}, reward {args.reward}" + (f" | resumed at step {step}" if args.resume else "")]))

    before = None if args.resume else run_eval(run, step, "step0")
    if args.stop_on_collapse:
        run.baseline = before or on_rank0(checkpoint.first_evaluation, run.out_dir)
    if args.resume:  # contested_greedy_rate and the flips continue from the last evaluation before the stop
        run.last_right = on_rank0(monitor.last_verdicts, run.out_dir)
    step, stopped_by = train_loop(run, step, total_steps)
    if stopped_by:
        report_stop(run, step, total_steps, stopped_by)
    after = None if stopped_by else run_eval(run, step, "final")
    if after is not None and args.stop_on_collapse:  # the last step's checkpoint waits for this evaluation
        reason = monitor.collapse_reason(after, run.baseline, args)
        if reason is None:
            save(run, step)
        else:
            report_stop(run, step, total_steps, f"collapse: {reason}")
    if before is not None and after is not None and before["overall"] is not None:
        parallel.print0(evaluate.before_after(before, after))
    parallel.shutdown()
    if stopped_by and stopped_by.startswith("non-finite"):
        raise SystemExit(1)  # a failed run; the message above names its last good checkpoint
    return after


if __name__ == "__main__":
    main()
    parallel.end_worker()  # under torchrun: gloo's threads outlive the process group (parallel.end_worker)
