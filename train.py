"""Med-Evo: test-time self-evolution of a medical VLM on an unlabeled split, with GRPO (arXiv 2603.07443).

One step, on B unlabeled questions (train_step below, in this order):
  1. rollout   - the policy samples G answers per question (rollout.py)
  2. forward   - one teacher-forced pass gives the answers' log-probs AND their last-layer hidden states
  3. FPL       - the pseudo label of a question is the answer nearest its group's embedding centroid (centroid.py)
  4. HSR       - each answer is rewarded against the label: exact match on top, token F1 + cosine below (reward.py)
  5. GRPO      - group-normalised advantages, clipped ratio, k3 KL to the frozen reference (grpo.py)
TTRL (majority vote + exact match) is the baseline; the field's other rules (RESTRAIN, EMPO, the EMA teacher,
EVOL-RL, RENT, the oracles) are entries of rules/'s tables, chosen by flags. Ground-truth answers never reach the
step unless a rule that says so reads them (the oracles); the loop reads them for diagnostics only.

    torchrun --nproc_per_node 1 train.py --dataset synthetic                       # offline, CPU
    torchrun --nproc_per_node 8 train.py --dataset slake --model Qwen/Qwen2.5-VL-7B-Instruct

Flags: harness/flags.py (`--help` reads as sections). Setup, resume, evaluation, saving: harness/setup.py. Scale (FSDP2,
fp32 masters under bf16 compute, checkpoints, memory plan): scale/. SIGTERM / Ctrl-C finish the current step,
write a checkpoint and exit 0; `--resume` continues exactly.
"""

import random
import time
from dataclasses import dataclass

import torch

import centroid
import evaluate
import grpo
import model as modeling
import monitor
import rollout
import rules
from models import tiny
from rules import label_samples
from harness import setup
from harness.flags import check_args, parse_args, run_flags
from scale import checkpoint, parallel
from scale.parallel import timed


@dataclass
class StepResult:
    """What a step hands the loop besides its stats: the loop's diagnostics read these (and the truth)."""
    texts: list  # [B*G] the trained answers
    label_texts: list  # [B] the labels they were rewarded against
    rewards: torch.Tensor  # [B*G]


# ----------------------------------------------------------------------------------------------
# One GRPO step


def train_step(run, records):
    """Rollout -> teacher-forced pass -> pseudo label -> reward -> advantages -> reference log-probs -> update.
    records: B questions, their answers None (unless an oracle rule reads them). Returns (stats, StepResult)."""
    args, policy, G, N = run.args, run.policy, run.args.group_size, run.args.label_samples
    timings = {}
    # 1. Rollout: N >= G answers per question (all N vote for the label; GRPO trains on the first G)
    with timed(timings, "rollout", run.device):
        prompt = rollout.build_inputs(run.tokenizer, run.image_processor, records, args.prompt_suffix, run.device)
        out = sample(run, prompt, N)  # [B*N] answers
    trained = rollout.first_of_each_group(out, N, G)  # [B*G]
    mask = trained.completion_mask.float()  # [B*G, T]
    for update in range(args.updates_per_rollout):
        # 2. Teacher-forced pass: the answers' log-probs (GRPO) and last-layer hidden states (FPL), in one pass
        with timed(timings, "policy_forward", run.device):
            logits, hidden = rollout.teacher_forced(policy, prompt, trained, G, run.dtype)  # [B*G, T, V|D]
            logp = grpo.token_logprobs(logits, trained.completion_ids)  # [B*G, T]
        if update == 0:  # steps 3-6 once per rollout; later updates reuse them (the ratio is to the sampler)
            old_logp = logp.detach()
            with timed(timings, "fpl_hsr", run.device):
                emb = label_samples.embeddings(run, prompt, out, hidden, timings)  # [B*N, D]
                batch = rules.Batch(records, prompt, out.texts, emb, trained, logits, G, N, timings)
                # 3. Pseudo label of each question: FPL (Med-Evo) or majority vote (TTRL)
                labels = rules.labeler(args)(run, batch)  # centroid.PseudoLabels: texts [B], cos [B*N]
                # 4. Reward of each trained answer against its question's label: HSR (Med-Evo) or exact (TTRL)
                rewards = rules.rewarder(args)(run, batch, labels).to(logp.device)  # [B*G]
                # 5. Group-relative advantages (shares: each label's vote share, the consensus)
                shares = centroid.label_shares(out.texts, N, labels.texts)  # [B]
                adv = rules.advantager(args)(run, rewards, shares)  # grpo.Advantages
            del batch  # it holds the logits, the step's largest tensor: gone with the graph after backward
            # 6. The frozen reference's log-probs, for the KL term
            with timed(timings, "reference_forward", run.device):
                ref_logp = reference_logprobs(run, prompt, trained)  # [B*G, T] or None
        del logits, hidden
        # 7. GRPO update: clipped ratio to the sampling policy, k3 KL to the reference; FSDP reduces the gradients
        loss, update_stats = grpo.grpo_loss(logp, old_logp, ref_logp, adv.advantages, mask, clip_eps=args.clip_eps,
                                            kl_coef=args.kl_coef, agg=args.loss_agg, keep=adv.keep)
        if update == 0:
            stats = dict(update_stats)  # the step logs the fresh rollout's view
        with timed(timings, "backward_and_step", run.device):
            finite = backward_and_step(run, loss, stats)
        if not finite:  # a NaN / inf gradient on any rank: every rank skips, weights and AdamW state unchanged
            stats["skipped"] = "non-finite gradient"
    stats.update(reward=float(adv.rewards.mean()), consensus=sum(shares) / len(shares), untrusted=adv.untrusted,
                 answer_length=float(mask.sum(1).mean()), **parallel.stage_seconds(timings),
                 **parallel.peak_memory(run.device))
    return stats, StepResult(trained.texts, labels.texts, adv.rewards)


def sample(run, prompt, n):
    """n answers per question from the policy, every unit gathered once for the whole loop (rollout.sample)."""
    run.policy.eval()  # sampling needs the KV cache, which gradient checkpointing turns off in train mode
    with parallel.gathered(run.policy, run.dtype):
        out = rollout.sample(run.policy, run.tokenizer, prompt, n, run.args.max_new_tokens, run.args.temperature,
                             run.args.top_p, run.generator)
    run.policy.train()
    return out


def reference_logprobs(run, prompt, trained):
    """log-probs [B*G, T] of the trained answers under the frozen reference; None when --kl-coef 0."""
    if run.args.kl_coef == 0:
        return None
    with torch.no_grad():
        ref_logits, _ = rollout.teacher_forced(run.reference, prompt, trained, run.args.group_size, run.dtype)
        return grpo.token_logprobs(ref_logits, trained.completion_ids)


def backward_and_step(run, loss, stats):
    """Backward, clip, and AdamW's step when the gradient is finite on every rank; returns whether it was."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"], finite = parallel.clip_gradients(run.policy, run.args.grad_clip)
    if finite:
        run.optimizer.step()
    return finite


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


def diagnostics(run, records, result):
    """What the step's labels were worth against the truth (hit rate, label quality on contested groups):
    computed here from the step's outputs, never inside the step. nan / null on unlabeled data."""
    answers = [run.answers[r["qid"]] for r in records]
    hits = evaluate.fully_right(result.label_texts, records, answers)
    greedy_right = [(run.last_right or {}).get(r["qid"]) for r in records]
    return {"hit_rate": float("nan") if hits is None else sum(hits) / len(hits),
            **monitor.label_quality_counts(result.rewards, run.args.group_size, result.texts, result.label_texts,
                                           answers, hits, greedy_right)}


# ----------------------------------------------------------------------------------------------
# The loop


def train_loop(run, step, total_steps):
    """GRPO steps until total_steps, a SIGTERM / SIGINT, --max-skipped-steps non-finite gradients in a row,
    or (--stop-on-collapse) a collapse. Returns (step, why it stopped early or None). With --stop-on-collapse,
    checkpoints follow healthy evaluations only, so the one left behind is the last before the collapse."""
    args, seen = run.args, setup.training_records(run)  # answers None unless a chosen rule reads them
    if args.resume and setup.evaluation_due(step, args, total_steps):  # a SIGTERM may have skipped it
        setup.run_eval(run, step, f"step{step}")
    t_start, first_step, skipped = time.time(), step, 0
    with parallel.stop_on_signal() as received:
        while step < total_steps:
            t0 = time.time()
            global_batch = batch_for_step(seen, step, args.questions_per_step, args.seed)
            records = [seen[i] for i in shard(global_batch, run.rank, run.world_size)]
            stats, result = train_step(run, records)
            stats.update(diagnostics(run, records, result))
            step += 1
            rules.after_step(run, step, total_steps)  # the EMA teacher's update, when it is on
            stats = dict(monitor.label_quality(parallel.mean_over_ranks(stats)), seconds_step=time.time() - t0)
            eta = (time.time() - t_start) / (step - first_step) * (total_steps - step)
            parallel.print0(monitor.format_step(step, total_steps, stats, eta), flush=True)
            setup.record(run, {"step": step, "questions": [seen[i]["qid"] for i in global_batch], **stats})
            skipped = skipped + 1 if "skipped" in stats else 0  # the same on every rank
            if skipped >= args.max_skipped_steps:
                return step, f"non-finite gradients: {skipped} steps in a row skipped"
            stopping = parallel.any_rank(received)
            if stopping or (not args.stop_on_collapse and (step % args.save_every == 0 or step == total_steps)):
                setup.save(run, step)
            if stopping:
                return step, received[0] if received else "a signal to another rank"
            if setup.evaluation_due(step, args, total_steps):
                scores = setup.run_eval(run, step, f"step{step}")
                reason = monitor.collapse_reason(scores, run.baseline, args) if args.stop_on_collapse else None
                if reason:
                    return step, f"collapse: {reason}"
                if args.stop_on_collapse:
                    setup.save(run, step)
    return step, None


def main(argv=None):
    modeling.disable_cudnn_attention()  # on CUDA: cuDNN SDPA's backward gives NaN gradients with our masks
    args = parse_args(argv)
    if args.offload:
        parallel.prepare_offload()  # the pinned allocator's rounding bounded; the host step's threads
    rank, world_size, device = parallel.setup_distributed(modeling.default_device(), args.dist_timeout_minutes,
                                                          cpu_collectives=args.offload)
    sharded = parallel.use_fsdp(args.fsdp, args.offload, args.dtype, world_size)
    check_args(args, world_size, distributed=parallel.dist.is_initialized())
    labelled = setup.on_rank0(setup.load_data, args)  # every image opens, before any model loads
    notes = setup.on_rank0(checkpoint.prepare_out_dir, args.out_dir, args.resume, args.overwrite, world_size,
                           run_flags(args))
    checkpoint.check_shared_out_dir(args.out_dir)  # every rank writes its optimizer shard there
    model_name = setup.on_rank0(tiny.resolve_model, args.model, args.tiny_seed)  # hash-checks the tiny model
    run, step = setup.load_run(args, model_name, labelled, device, rank, world_size, sharded)
    steps = len(labelled) // args.questions_per_step * args.epochs
    total_steps = min(steps, args.max_steps) if args.max_steps else steps
    parallel.print0("\n".join(notes + [
        f"Med-Evo | {args.dataset}/{args.split}: {len(labelled)} questions | model {model_name} | {world_size} "
        f"process(es) on {device}, {args.dtype} compute, fp32 masters{', FSDP2' if sharded else ''} | "
        f"{total_steps} steps of {args.questions_per_step} questions x G={args.group_size} | pseudo-label "
        f"{args.pseudo_label}, reward {args.reward}" + (f" | resumed at step {step}" if args.resume else "")]))

    before = None if args.resume else setup.run_eval(run, step, "step0")
    if args.stop_on_collapse:
        run.baseline = before or setup.on_rank0(checkpoint.first_evaluation, run.out_dir)
    if args.resume:  # contested_greedy_rate and the flips continue from the last evaluation before the stop
        run.last_right = setup.on_rank0(monitor.last_verdicts, run.out_dir)
    step, stopped_by = train_loop(run, step, total_steps)
    if stopped_by:
        setup.report_stop(run, step, total_steps, stopped_by)
    after = None if stopped_by else setup.run_eval(run, step, "final")
    if after is not None and args.stop_on_collapse:  # the last step's checkpoint waits for this evaluation
        reason = monitor.collapse_reason(after, run.baseline, args)
        if reason is None:
            setup.save(run, step)
        else:
            setup.report_stop(run, step, total_steps, f"collapse: {reason}")
    if before is not None and after is not None and before["overall"] is not None:
        parallel.print0(evaluate.before_after(before, after))
    parallel.shutdown()
    if stopped_by and stopped_by.startswith("non-finite"):
        raise SystemExit(1)  # a failed run; the message above names its last good checkpoint
    return after


if __name__ == "__main__":
    main()
    parallel.end_worker()  # under torchrun: gloo's threads outlive the process group (parallel.end_worker)
