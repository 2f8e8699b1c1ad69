"""Med-Evo: test-time self-evolution of a medical VLM on an unlabeled split, with GRPO.

The whole method, one step at a time (arXiv 2603.07443):
  1. rollout   - the policy samples G answers for each unlabeled question (rollout.py)
  2. forward   - one teacher-forced pass gives the answers' log-probs AND their last-layer hidden
                 states (rollout.completion_logits_and_hidden): FPL costs no extra forward pass
  3. FPL       - the pseudo label of a group is the answer nearest its embedding centroid (centroid.py)
  4. HSR       - each answer is rewarded against the pseudo label: exact match on top, a soft
                 token-F1 + cosine score below it (reward.py)
  5. GRPO      - group-normalised advantages, clipped ratio, k3 KL to the frozen reference (grpo.py)

By default the split adapted to is the *test* split, as in the paper: adapt on the unlabeled test
questions, then score the same questions. Ground-truth answers are never read for training: they
are read only by evaluation and by logged diagnostics (the pseudo-label hit rate), and by the
`--reward oracle` ablation, which is the supervised upper bound and says so.

    torchrun --nproc_per_node 1 train.py --dataset synthetic                       # offline, CPU
    torchrun --nproc_per_node 8 train.py --dataset slake --data-root PATH --model Qwen/Qwen2.5-VL-3B-Instruct

Each rank takes a disjoint shard of every global batch; gradients are averaged across ranks by an
all-reduce after backward (what DDP does, written out, because the vision tower runs once per
question outside the model's forward). Checkpoints are plain `save_pretrained` folders plus the
optimizer, step and RNG state, written atomically; `--resume` continues a killed run exactly.
"""

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import centroid
import data
import evaluate
import grpo
import model as modeling
import reward
import rollout

# ----------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Med-Evo test-time self-evolution with GRPO (run under torchrun).")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "slake", "vqa_rad", "path_vqa"])
    p.add_argument("--data-root", default=None, help="dataset folder (default for synthetic: artifacts/synthetic, written on first use)")
    p.add_argument("--split", default="test", help="the unlabeled split adapted to and scored (default: test, as in the paper)")
    p.add_argument("--lang", default="en", help="SLAKE language subset: en (usual protocol) or all")
    p.add_argument("--model", default="tiny", help="hub name or folder; 'tiny' = the offline tiny base model (built on first use)")
    p.add_argument("--out-dir", default="runs/medevo", help="metrics.jsonl, predictions and checkpoints go here")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    # the method
    p.add_argument("--pseudo-label", default="fpl", choices=["fpl", "majority"], help="FPL (Med-Evo) or majority vote (TTRL)")
    p.add_argument("--reward", default="hsr", choices=["hsr", "exact", "f1", "oracle"],
                   help="hsr (Med-Evo), exact match or token F1 vs the pseudo label; oracle = exact match vs ground truth (upper bound, ablation only)")
    p.add_argument("--soft-weight", type=float, default=reward.DEFAULT_SOFT_WEIGHT, help="HSR: weight of the soft tier (< 1)")
    p.add_argument("--f1-weight", type=float, default=reward.DEFAULT_F1_WEIGHT, help="HSR: share of token F1 (vs cosine) in the soft tier")
    # sampling
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per question (G)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer sampled or evaluated")
    p.add_argument("--prompt-suffix", default=rollout.DEFAULT_PROMPT_SUFFIX, help="appended to every question")
    # optimisation
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: 1e-6 for a real model; 3e-5 with --model tiny, whose ~1M weights need larger steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the unlabeled split")
    p.add_argument("--questions-per-step", type=int, default=8, help="questions per optimizer step, over all ranks")
    p.add_argument("--updates-per-rollout", type=int, default=1, help="GRPO iterations on each rollout (mu); >1 makes clipping bite")
    p.add_argument("--kl-coef", type=float, default=0.04, help="beta of the k3 KL to the frozen reference (0 = no reference model)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range epsilon")
    p.add_argument("--loss-agg", default="seq-mean", choices=["seq-mean", "token-mean"], help="how token losses are averaged (token-mean is per rank, so with several ranks it is not exactly the global token mean; seq-mean is exact)")
    p.add_argument("--adv-scale", default="std", choices=["std", "none"], help="divide advantages by the group std (GRPO) or not (Dr. GRPO)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0 = run all epochs)")
    p.add_argument("--seed", type=int, default=0)
    # evaluation, checkpoints, hardware
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always before and after; 0 = only those)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for GPU, off for CPU)")
    p.add_argument("--freeze-vision", action="store_true", help="train only the language model, not the vision tower")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 3e-5 if args.model == "tiny" else 1e-6
    return args


def check_args(args, world_size):
    """Flag combinations that cannot work fail here, before any model is loaded."""
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: GRPO needs at least 2 answers per question")
    if args.questions_per_step < 1 or args.questions_per_step % world_size:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} must be a positive multiple of the "
                         f"number of processes ({world_size})")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature {args.temperature}: sampling a group needs temperature > 0")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p {args.top_p} must be in (0, 1]")
    if not 0 <= args.soft_weight < 1:
        raise SystemExit(f"--soft-weight {args.soft_weight} must be in [0, 1) so that exact match always scores highest")
    if not 0 <= args.f1_weight <= 1:
        raise SystemExit(f"--f1-weight {args.f1_weight} must be in [0, 1]")
    if args.model != "tiny":
        try:
            modeling.check_model_name(args.model)
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from err
    if args.dataset != "synthetic" and args.data_root is None:
        raise SystemExit(f"--dataset {args.dataset} needs --data-root")
    if args.resume and not (Path(args.out_dir) / "checkpoint" / "trainer_state.pt").is_file():
        raise SystemExit(f"--resume: no checkpoint at {Path(args.out_dir) / 'checkpoint'}")


# ----------------------------------------------------------------------------------------------
# Processes


def setup_distributed():
    """(rank, world_size, device): torchrun's environment, NCCL on GPU, gloo on CPU; plain python works too."""
    if "RANK" not in os.environ:
        return 0, 1, modeling.default_device()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def average_gradients(model):
    """Sum every gradient over ranks and divide by their number: the data-parallel all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world_size = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world_size


def mean_over_ranks(values):
    """Average a dict of floats over ranks (for logging)."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def gather_lists(items):
    """Concatenate every rank's list, in rank order."""
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


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


def clock(device):
    """Wall time after the device's queued work is done, so per-stage timings are honest on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def rewards_for_rollout(hidden, out, group_size, args, refs=None):
    """FPL or majority pseudo labels, then rewards: returns (rewards [N], labels [N // G])."""
    emb = centroid.answer_embeddings(hidden.detach().float(), out.completion_mask)  # [N, D]
    if args.pseudo_label == "fpl":
        labels = centroid.fpl_pseudo_labels(emb, group_size)
    else:
        labels = torch.tensor(centroid.majority_vote(out.texts, group_size))
    cos = centroid.cosine_to_pseudo_label(emb, group_size, labels)  # [N]
    rewards = reward.compute_rewards(out.texts, group_size, labels, cos, kind=args.reward, refs=refs,
                                     soft_weight=args.soft_weight, f1_weight=args.f1_weight)
    return rewards, labels


def policy_loss(policy, reference, prompt, out, group_size, args, refs=None, timings=None, rollout_scores=None):
    """Everything between the rollout and backward: log-probs, FPL, HSR, advantages, GRPO loss.

    The first update on a rollout computes its scores (old log-probs, pseudo labels, rewards,
    advantages, reference log-probs) and returns them; later updates (--updates-per-rollout > 1)
    pass them back in, so that the ratio is taken against the policy that sampled the answers.
    Returns (loss, stats, rollout_scores).
    """
    timings = {} if timings is None else timings
    t0 = clock(policy.device)
    logits, hidden = rollout.completion_logits_and_hidden(policy, prompt, out.completion_ids, out.completion_mask, group_size)
    logp = grpo.token_logprobs(logits, out.completion_ids)  # [N, T]
    del logits
    t1 = clock(policy.device)
    if rollout_scores is None:
        rewards, labels = rewards_for_rollout(hidden, out, group_size, args, refs)
        advantages = grpo.group_advantages(rewards.to(logp.device), group_size, scale=args.adv_scale)
        t2 = clock(policy.device)
        ref_logp = None
        if args.kl_coef > 0:
            with torch.no_grad():
                ref_logits, _ = rollout.completion_logits_and_hidden(reference, prompt, out.completion_ids,
                                                                     out.completion_mask, group_size)
                ref_logp = grpo.token_logprobs(ref_logits, out.completion_ids)
        t3 = clock(policy.device)
        for name, seconds in [("fpl_hsr", t2 - t1), ("reference_forward", t3 - t2)]:
            timings[name] = timings.get(name, 0.0) + seconds
        rollout_scores = dict(old_logp=logp.detach(), ref_logp=ref_logp, rewards=rewards, labels=labels,
                              advantages=advantages)
    timings["policy_forward"] = timings.get("policy_forward", 0.0) + t1 - t0
    mask = out.completion_mask.to(logp.dtype)
    loss, stats = grpo.grpo_loss(logp, rollout_scores["old_logp"], rollout_scores["ref_logp"],
                                 rollout_scores["advantages"], mask, clip_eps=args.clip_eps,
                                 kl_coef=args.kl_coef, agg=args.loss_agg)
    return loss, {k: float(v) for k, v in stats.items()}, rollout_scores


def train_step(policy, reference, optimizer, tokenizer, image_processor, records, answers, args, generator):
    """Rollout -> policy forward -> FPL -> HSR -> advantages -> GRPO loss -> (all-reduce) -> AdamW step."""
    G = args.group_size
    timings = {}
    t0 = clock(policy.device)
    prompt = rollout.build_inputs(tokenizer, image_processor, records, args.prompt_suffix, policy.device)
    policy.eval()  # sampling: no dropout; Qwen has none, but a fork might
    out = rollout.sample(policy, tokenizer, prompt, G, args.max_new_tokens, args.temperature, args.top_p, generator)
    timings["rollout"] = clock(policy.device) - t0
    policy.train()
    refs = answers if args.reward == "oracle" else None  # the supervised upper bound reads labels; Med-Evo never does
    scores = None
    for update in range(args.updates_per_rollout):
        loss, update_stats, scores = policy_loss(policy, reference, prompt, out, G, args, refs, timings, scores)
        if update == 0:
            stats = update_stats  # log the first update's view of the fresh rollout
        t_backward = clock(policy.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(policy)
        if args.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip))
        optimizer.step()
        timings["backward_and_step"] = timings.get("backward_and_step", 0.0) + clock(policy.device) - t_backward
    label_texts = [out.texts[g * G + int(i)] for g, i in enumerate(scores["labels"])]
    stats.update(
        reward=float(scores["rewards"].mean()),
        answer_length=float(out.completion_mask.sum(1).float().mean()),
        hit_rate=pseudo_label_hit_rate(label_texts, records, answers),
        **{f"seconds_{k}": v for k, v in timings.items()},
    )
    return stats


def pseudo_label_hit_rate(label_texts, records, answers):
    """Share of questions whose pseudo label the benchmark's metric would score fully correct (diagnostic).

    NaN when the split carries no answers: training itself never needs them.
    """
    if any(answer is None for answer in answers):
        return float("nan")
    hits = [evaluate.question_score(label, answer, r["answer_type"]) == 1.0
            for label, answer, r in zip(label_texts, answers, records)]
    return sum(hits) / len(hits)


# ----------------------------------------------------------------------------------------------
# Evaluation (greedy answers on the whole split, sharded over ranks)


def evaluate_split(policy, tokenizer, image_processor, labelled, args, rank, world_size, tag, out_dir):
    ranks_share = labelled[rank::world_size]
    preds = evaluate.predict(policy, tokenizer, image_processor, ranks_share, batch_size=args.eval_batch_size,
                             prompt_suffix=args.prompt_suffix, max_new_tokens=args.max_new_tokens)
    pairs = gather_lists([(r["qid"], p) for r, p in zip(ranks_share, preds)])
    by_qid = dict(pairs)
    preds = [by_qid[r["qid"]] for r in labelled]
    scores = evaluate.score_predictions(labelled, preds)
    if rank == 0:
        evaluate.write_predictions(out_dir / f"predictions_{tag}.jsonl", labelled, preds)
    return scores


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out_dir, policy, tokenizer, image_processor, optimizer, step, generator, rank):
    """<out_dir>/checkpoint: a loadable model folder + trainer_state.pt; replaced atomically."""
    rng_states = gather_lists([generator.get_state()])
    if rank == 0:
        final, tmp = out_dir / "checkpoint", out_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "sampler_rng": rng_states,
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        old = out_dir / "checkpoint.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_trainer_state(out_dir, optimizer, generator, rank, world_size):
    state = torch.load(out_dir / "checkpoint" / "trainer_state.pt", weights_only=False)
    if len(state["sampler_rng"]) != world_size:
        raise SystemExit(f"--resume: the checkpoint was written by {len(state['sampler_rng'])} processes, "
                         f"this run has {world_size}")
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["sampler_rng"][rank])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# Main loop


def prepare_policy(policy, args, device):
    """Freeze the vision tower and turn on gradient checkpointing as the flags say; return AdamW."""
    if args.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda":
        policy.gradient_checkpointing_enable()
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=args.weight_decay)


def format_eta(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    check_args(args, world_size)
    out_dir = Path(args.out_dir)
    log = print if rank == 0 else (lambda *a, **k: None)

    # model and data (the offline defaults are built by rank 0 once, the others wait)
    data_root = args.data_root or modeling.SYNTHETIC_DIR
    if rank == 0:
        modeling.resolve_model(args.model)
        if args.dataset == "synthetic":
            modeling.ensure_synthetic(data_root)
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    model_name = modeling.resolve_model(args.model)  # built by now: just the path
    labelled = [data.load_split(args.dataset, data_root, args.split, lang=args.lang) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(labelled, src=0)
    labelled = labelled[0]
    answers_by_qid = {r["qid"]: r["answer"] for r in labelled}  # for evaluation and diagnostics only
    unlabeled = [dict(r, answer=None) for r in labelled]  # what training sees
    steps_per_epoch = len(unlabeled) // args.questions_per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} exceeds the split's {len(unlabeled)} questions")
    total_steps = steps_per_epoch * args.epochs
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps

    start_from = out_dir / "checkpoint" if args.resume else model_name
    policy, tokenizer, image_processor = modeling.load(start_from, device)
    reference = None
    if args.kl_coef > 0:
        reference, _, _ = modeling.load(model_name, device)
        reference.eval().requires_grad_(False)
    optimizer = prepare_policy(policy, args, device)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    torch.manual_seed(args.seed)
    step = load_trainer_state(out_dir, optimizer, generator, rank, world_size) if args.resume else 0
    log(f"Med-Evo | {args.dataset}/{args.split}: {len(unlabeled)} questions | model {model_name} | "
        f"{world_size} process(es) on {device} | {total_steps} steps of {args.questions_per_step} questions x G={args.group_size} | "
        f"pseudo-label {args.pseudo_label}, reward {args.reward}" + (f" | resumed at step {step}" if args.resume else ""))

    metrics_file = out_dir / "metrics.jsonl"

    def record(entry):
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def run_eval(tag):
        scores = evaluate_split(policy, tokenizer, image_processor, labelled, args, rank, world_size, tag, out_dir)
        log(f"eval {tag}\n" + evaluate.format_table(scores))
        record({"step": step, "eval": tag, **scores})
        return scores

    before = run_eval(f"step{step}") if not args.resume else None
    t_start, steps_done = time.time(), 0
    while step < total_steps:
        t0 = time.time()
        global_batch = batch_for_step(unlabeled, step, args.questions_per_step, args.seed)
        records = [unlabeled[i] for i in shard(global_batch, rank, world_size)]
        answers = [answers_by_qid[r["qid"]] for r in records]  # diagnostics (hit rate) and the oracle ablation only
        stats = train_step(policy, reference, optimizer, tokenizer, image_processor, records, answers, args, generator)
        step += 1
        steps_done += 1
        stats = mean_over_ranks(stats)
        stats["seconds_step"] = time.time() - t0
        eta = (time.time() - t_start) / steps_done * (total_steps - step)
        log(f"step {step}/{total_steps} | reward {stats['reward']:.3f} | hit {stats['hit_rate']:.2f} | "
            f"kl {stats['kl']:.4f} | clip {stats['clip_frac']:.3f} | len {stats['answer_length']:.1f} | "
            f"{stats['seconds_step']:.1f}s/step | ETA {format_eta(eta)}", flush=True)
        record({"step": step, "questions": [unlabeled[i]["qid"] for i in global_batch], **stats})
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            run_eval(f"step{step}")
        if step % args.save_every == 0 or step == total_steps:
            save_checkpoint(out_dir, policy, tokenizer, image_processor, optimizer, step, generator, rank)
    after = run_eval("final")
    if before is not None and before["overall"] is not None:
        log("before -> after: " + ", ".join(f"{name} {100 * before[key]:.2f} -> {100 * after[key]:.2f}"
                                         for key, name in [("overall", "overall"), ("open_recall", "open recall"),
                                                           ("closed_acc", "closed accuracy")] if before[key] is not None))
    if dist.is_initialized():
        dist.destroy_process_group()
    return after


if __name__ == "__main__":
    main()
