"""The EMA teacher (Co-rewarding-II, arXiv 2508.00410; code tmlr-group/Co-rewarding, Co-rewarding-II/): the
pseudo label comes from a slow copy of the policy, so that the label cannot simply follow the policy's drift.

The teacher samples its own N answers per question (as the policy does) and its majority vote is the label the
policy's answers are rewarded against; with FPL, the teacher's own answer nearest its own centroid (one more
teacher forward for its hidden states). Their label is the majority of the teacher's boxed answers on the same
question (data.use_aug=False in their run script). After every GRPO step:
    teacher <- a * teacher + (1 - a) * policy,   a(k) = end + (start - end) * (1 + cos(pi * k / K)) / 2
k = steps done (1..K), K = the run's steps: a goes from start (k = 0) to end (k = K) by a cosine.
Their code (verl/workers/sharding_manager/fsdp_vllm.py, _update_ref_model_sliding_average and update_alpha)
writes it with the policy's weight 1 - a: ref <- alpha * policy + (1 - alpha) * ref, alpha annealed by the
same cosine over t = step - 1 from alpha_start to alpha_end, before each rollout (update_interval 1), so
the update before step k + 1 uses t = k, as ours after step k does. Their run script
(run_corewarding-II.sh) uses alpha 0.01 -> 1e-5, i.e. a = 0.99 -> 0.99999; the paper's 0.99 -> 0.9999 is
our default. The teacher is held in fp32, like the policy's masters, and computes in the compute dtype
(autocast): in bf16 an EMA step of (1 - a) * (policy - teacher) ~ 1e-2 * 1e-3 of a weight is far below
bf16's resolution (~4e-3 relative) and the teacher would never move. Their teacher is also the KL
reference; ours is not (the frozen base stays the reference). Under FSDP it is sharded like the policy (fp32
shards, the compute dtype on the fly, parallel.load_sharded_teacher): the update is then shard by shard.

`--ema-teacher`. The interface (rules/__init__.py's LABELERS): fn(run, batch) -> centroid.PseudoLabels.
"""

import math

import torch
from torch.distributed.tensor import DTensor

import centroid
import model as modeling
import rollout
from scale import parallel

DEFAULT_START, DEFAULT_END = 0.99, 0.9999  # Co-rewarding-II's teacher decay, annealed by cosine


@torch.no_grad()
def labels(run, batch):
    """LABELERS["ema-teacher"]: the teacher's own label of each question, and the policy's answers' cosines
    to it (HSR's soft tier; 0 in a group where no answer of the policy says it)."""
    with parallel.timed(batch.timings, "teacher", run.device):
        texts = teacher_labels(run.teacher, run.tokenizer, batch.prompt, run.args, run.dtype, run.generator)
    return centroid.from_texts(batch.emb, batch.texts, batch.label_samples, texts)


@torch.no_grad()
def teacher_labels(teacher, tokenizer, prompt, args, dtype, generator):
    """The teacher samples N answers per question, then majority vote or FPL (on its own embeddings) over them.
    Returns B label texts."""
    n = args.label_samples
    with parallel.gathered(teacher, dtype):  # sharded: every unit gathered once for the whole block
        out = rollout.sample(teacher, tokenizer, prompt, n, args.max_new_tokens, args.temperature, args.top_p,
                             generator)
        if args.pseudo_label == "majority":
            return centroid.label_texts(out.texts, n, centroid.majority_vote(out.texts, n))
        _, hidden = rollout.teacher_forced(teacher, prompt, out, n, dtype)
    emb = centroid.answer_embeddings(hidden, out.completion_mask)
    return centroid.label_texts(out.texts, n, centroid.fpl_pseudo_labels(emb, n))


def after_step(run, step, total_steps):
    """teacher <- a * teacher + (1 - a) * policy, with a annealed from --ema-start to --ema-end."""
    ema_update(run.teacher, run.policy, ema_decay(step, total_steps, run.args.ema_start, run.args.ema_end))


def ema_decay(step, total_steps, start=DEFAULT_START, end=DEFAULT_END):
    """The teacher's decay after `step` of `total_steps` GRPO steps: start at 0, end at total_steps, cosine."""
    k = min(max(step, 0), total_steps)
    return end + (start - end) * (1.0 + math.cos(math.pi * k / max(total_steps, 1))) / 2.0


@torch.no_grad()
def ema_update(teacher, policy, decay):
    """teacher <- decay * teacher + (1 - decay) * policy, parameter by parameter (matched by name). Sharded
    (FSDP2), both are sharded alike, so each rank updates its own shard: no communication."""
    policy_params = dict(policy.named_parameters())
    for name, t in teacher.named_parameters():
        t, p = local_shard(t), local_shard(policy_params[name].detach())
        if t.shape != p.shape:
            raise ValueError(f"{name}: the teacher's shard {tuple(t.shape)} and the policy's {tuple(p.shape)} "
                             f"differ; the two must be sharded alike")
        t.mul_(decay).add_(p.to(t.dtype), alpha=1.0 - decay)


def local_shard(tensor):
    """This rank's part of a sharded (DTensor) parameter; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def load(model_name, device, dtype, sharded, state_file=None):
    """The start model in fp32, frozen, in eval mode (on --resume with the checkpoint's teacher.pt over it);
    sharded like the policy when the policy is."""
    if sharded:
        return parallel.load_sharded_teacher(model_name, device, dtype, state_file)
    teacher = modeling.load_model(model_name, device, torch.float32).eval().requires_grad_(False)
    if state_file is not None:
        teacher.load_state_dict(torch.load(state_file, map_location=device, weights_only=True))
    return teacher


# ----------------------------------------------------------------------------------------------
# Flags and checks


def add_flags(group):
    group.add_argument("--ema-teacher", action="store_true",
                       help="Co-rewarding-II (arXiv 2508.00410): the pseudo label comes from an EMA copy of the "
                            "policy, by majority vote or FPL over its own N samples (rules/ema_teacher.py); fp32, "
                            "sharded like the policy")
    group.add_argument("--ema-start", type=float, default=DEFAULT_START,
                       help="the teacher's EMA decay at the start (Co-rewarding-II: 0.99)")
    group.add_argument("--ema-end", type=float, default=DEFAULT_END,
                       help="the teacher's EMA decay at the last step, reached by a cosine (Co-rewarding-II: 0.9999)")


RANGES = [("ema_start", lambda v: 0 <= v <= 1, "in [0, 1]"),
          ("ema_end", lambda v: 0 <= v <= 1, "in [0, 1]")]


def check(args):
    if args.ema_teacher and args.reward in ("entropy", "oracle", "noisy-oracle"):
        raise SystemExit(f"--ema-teacher gives the pseudo label, which --reward {args.reward} does not use")
    if args.ema_teacher and args.offload:
        raise SystemExit("--ema-teacher with --offload: the teacher is sharded on the device, the policy's "
                         "masters in host memory; drop --offload")
