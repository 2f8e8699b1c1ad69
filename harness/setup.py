"""A run's setup, resume, evaluation and saving: everything train.py's loop needs that is not the method.

Everything that can fail on bad input runs on rank 0 before any model loads (on_rank0), and every rank exits with
the same one-line message.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import evaluate
import model as modeling
import monitor
import rules
from models import tiny
from rules import ema_teacher, oracle
from harness.flags import run_flags
from scale import checkpoint, memory, parallel


@dataclass
class Run:
    """Everything the training loop, the step and the evaluations share."""
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
    device: torch.device  # where this rank computes (under --offload the masters are on the host)
    dtype: torch.dtype  # the compute dtype
    out_dir: Path
    baseline: dict | None = None  # the evaluation before training: the collapse monitor compares with it
    last_right: dict | None = None  # {qid: greedy answer fully right} at the last evaluation (diagnostics)
    saved_step: int | None = None  # the step of the newest checkpoint written by this process
    teacher: torch.nn.Module | None = None  # --ema-teacher: the EMA copy of the policy (fp32, frozen)
    answers: dict | None = None  # {qid: the true answer}: the loop's diagnostics only, never the step


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
    oracle.check_data(args, labelled, f"{args.dataset}/{args.split}")
    if len(labelled) < args.questions_per_step:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} exceeds the split's {len(labelled)} "
                         f"questions")
    return labelled


def prepare_modules(policy, args):
    """Freeze the vision tower and turn on gradient checkpointing, as the flags say."""
    if args.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def adamw(policy, args):
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=args.weight_decay)


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
              device, dtype, Path(args.out_dir), answers={r["qid"]: r["answer"] for r in labelled})
    if args.ema_teacher:  # the start model, or on --resume the checkpoint's teacher.pt; sharded like the policy
        state_file = run.out_dir / "checkpoint" / "teacher.pt" if args.resume else None
        run.teacher = ema_teacher.load(model_name, device, dtype, sharded, state_file)
    step = 0
    if args.resume:
        step = checkpoint.load_trainer_state(run.out_dir, policy, optimizer, generator, rank, args.lr)
    return run, step


def make_run(args, policy, tokenizer, image_processor, reference=None, teacher=None, device=torch.device("cpu"),
             labelled=()):
    """A one-process Run around models already loaded (bench.py, tests): the flags' modules, AdamW, sampler RNG."""
    prepare_modules(policy, args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return Run(args, policy, reference, tokenizer, image_processor, adamw(policy, args), generator, list(labelled), 0,
               1, device, parallel.DTYPES[args.dtype], Path(args.out_dir), teacher=teacher,
               answers={r["qid"]: r["answer"] for r in labelled})


def training_records(run):
    """What the step sees: the questions without their answers, unless a chosen rule reads them (the oracles)."""
    if rules.reads_labels(run.args):
        return run.labelled
    return [dict(r, answer=None) for r in run.labelled]


# ----------------------------------------------------------------------------------------------
# Evaluation, logging and saving


def evaluation_due(step, args, total_steps):
    """--eval-every's evaluations between steps (the final one always runs)."""
    return args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps


def record(run, row):
    if run.rank == 0:
        checkpoint.append_row(run.out_dir / "metrics.jsonl", row)


def run_eval(run, step, tag):
    scores, right = evaluate.evaluate_split(run.policy, run.tokenizer, run.image_processor, run.labelled, run.args,
                                            run.rank, run.world_size, tag, run.out_dir, run.device)
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
