"""Benchmark: how fast the rollout sampler is, and where one Med-Evo training step spends its time.

Med-Evo (arXiv 2603.07443) samples G answers per unlabeled question at every GRPO step, so the
sampler and the step's split between rollout, forward/backward passes and the FPL + HSR
bookkeeping decide how long test-time adaptation takes. Two measurements, in one run:

  1. sampler throughput: answer tokens per second of our `rollout.sample` (prefill once per
     question, KV cache shared by the G answers) against `model.generate(num_return_sequences=G)`,
     same model, same prompts (one `rollout.build_inputs` batch), same sampling distribution
     (temperature 1, top-p 1, no top-k, no repetition penalty), same max answer length, for G = 1
     and G = 8. Answer tokens are the real ones: up to and including the first EOS. Sampled lengths
     differ between the two, so the mean answer length of each is reported next to its tokens/s.
  2. training-step split: `train.train_step` (flags from `train.parse_args`, G = 8) reports the
     seconds spent in rollout, policy forward, backward + AdamW step, reference forward and FPL + HSR;
     each is shown as seconds and as a share of the step's wall time. Target: FPL + HSR < 5%.
     `--train-flags="..."` adds a row's flags (e.g. --ema-teacher: the teacher's rollout and EMA update
     are timed too, and its memory reported), so a rule's cost is a difference of two bench runs.

Each timing is the median of --repeats runs after one warmup run, under torch.inference_mode for
the sampler, with the GPU synchronized before the clock is read.

`--passes` measures instead the teacher-forced pass (rollout.completion_logits_and_hidden) with each prompt
encoded once for its G = 8 answers (`_shared`, one packed row per question under a 4-D mask) against once per
answer (`_unshared`): forward + backward and no-grad forward seconds, the bytes autograd saves for backward
(saved_tensors_hooks, distinct storages, parameters excluded) and the ratios, on (a) the shipped tiny base model
(synthetic test questions) and (b) a wider random Qwen2.5-VL (text hidden 256, 4 layers) with 532 x 532
images, i.e. ~400-token prompts, a real prompt's length:

    OMP_NUM_THREADS=1 python -m experiments.bench --passes --device cpu --repeats 3

    python -m experiments.bench --random-tiny --device cpu --questions 2 --repeats 1    # quick check, no model build
    python -m experiments.bench                                                         # the warm-started tiny model
    python -m experiments.bench --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda
    python -m experiments.bench --qwen-3b-random --device cuda                          # 3B architecture, random weights

--qwen-3b-random builds Qwen2.5-VL-3B-Instruct's architecture (its public config, written out in memory.py)
with random weights, with no download. It borrows a small locally trained tokenizer, so the
special-token ids are remapped to that tokenizer's: only speed and memory mean anything there.
"""

import argparse
import copy
import json
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

import data
import model as modeling
import rollout
import rules
import train
from harness import setup
from models import tiny
from rules import ema_teacher
from scale import memory, parallel

GROUP_SIZES = (1, 8)  # sampler comparison
TRAIN_GROUP_SIZE = 8  # the training step
FPL_HSR_TARGET = 0.05  # FPL + HSR should stay under 5% of a step

QUESTIONS = [  # for generated records: different lengths, so prompts get different paddings
    "What modality is used to take this image?",
    "Is there a lesion?",
    "Where is the lesion in the left lung of this patient?",
    "How many kidneys are in the image?",
    "Is this a CT scan?",
    "Which organ is the largest one in this image?",
    "Does the heart look enlarged?",
    "In which plane is this image taken?",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="hub name or folder; 'tiny' = the shipped offline tiny base model (seed 0)")
    p.add_argument("--random-tiny", action="store_true",
                   help="a random-weight tiny model of the tiny base's size, built in a temp dir")
    p.add_argument("--qwen-3b-random", action="store_true",
                   help="Qwen2.5-VL-3B's architecture with random weights (speed and memory only)")
    p.add_argument("--qwen-layers", type=int, default=0,
                   help="with --qwen-3b-random: only this many text layers and vision blocks"
                        " (a code-path check, not a result)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--questions", type=int, default=8, help="questions in the batch (prefilled together)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer sampled")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warmup; the median is reported")
    p.add_argument("--image-size", type=int, default=448,
                   help="side in pixels of the generated images (not the synthetic split)")
    p.add_argument("--part", default="all", choices=["all", "sampler", "train"], help="which measurement to run")
    p.add_argument("--train-flags", default="",
                   help="train.py flags for the training-step part, with '=', e.g. --train-flags=\"--pseudo-label "
                        "majority --reward exact --ema-teacher\": what a row's rules add to a step (docs/collapse_rules.md)")
    p.add_argument("--passes", action="store_true",
                   help="instead: time the teacher-forced pass with each prompt encoded once for its G=8 answers "
                        "(shared prefix) against once per answer, on the tiny base model and a wider random model "
                        "with ~400-token prompts (--questions per batch, --max-new-tokens answer tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="where the results are written as JSON")
    modeling.add_pixel_flags(p)
    args = p.parse_args(argv)
    modeling.check_pixel_flags(args.max_pixels, args.min_pixels)
    if args.random_tiny and args.qwen_3b_random:
        raise SystemExit("--random-tiny and --qwen-3b-random each pick the model: give one of them")
    if (args.random_tiny or args.qwen_3b_random) and args.model != "tiny":
        raise SystemExit(f"--model {args.model} cannot be combined with --random-tiny or --qwen-3b-random")
    if args.passes and (args.random_tiny or args.qwen_3b_random or args.model != "tiny"):
        raise SystemExit("--passes runs its own two models (the tiny base and a wider random one): no other model flag")
    if args.qwen_layers and not args.qwen_3b_random:
        raise SystemExit("--qwen-layers only applies to --qwen-3b-random")
    for flag in ["questions", "max_new_tokens", "repeats", "image_size"]:
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.qwen_layers < 0:
        raise SystemExit(f"--qwen-layers {args.qwen_layers} must be positive (0 = the full 36 / 32)")
    try:
        train_step_args(args)  # train.py's own parser checks --train-flags, before any model loads
    except SystemExit as err:
        raise SystemExit(f"--train-flags {args.train_flags!r}: not valid train.py flags (exit {err.code})") from err
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return args


# ----------------------------------------------------------------------------------------------
# Counting and timing


def count_answer_tokens(completion_ids, eos_ids):
    """Real answer tokens per row [N] of completion_ids [N, T]: up to and including the first EOS.

    A row that never emits EOS counts all T tokens; whatever follows an EOS (padding) is not counted.
    """
    eos = torch.as_tensor(eos_ids, device=completion_ids.device)
    return rollout.completion_mask_from_ids(completion_ids, eos).sum(dim=1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds), with the GPU's queued work finished before each clock reading."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# Records and models


def generated_records(folder, n, image_size, seed):
    """n records with random-noise images (image_size x image_size) and questions of varied length."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = Path(folder) / f"bench{i}.png"
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(path)
        records.append({"image": str(path), "question": QUESTIONS[i % len(QUESTIONS)], "answer": None,
                        "answer_type": "OPEN", "qid": i})
    return records


def synthetic_test_records(n):
    records = data.load_split("synthetic", tiny.ensure_synthetic(), "test")
    if len(records) < n:
        raise SystemExit(f"--questions {n}: the synthetic test split has only {len(records)} questions")
    return records[:n]


def build_random_qwen_3b(records, device, layers=0):
    """(model, tokenizer, image_processor): random 3B weights built on the device, bf16 on GPU, fp32 on CPU."""
    tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(records))
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in memory.QWEN_TOKEN_IDS}  # remapped to the local ones
    config = memory.qwen25_vl_config("3B", layers, token_ids)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialise the weights where they will live: no 15 GB fp32 copy on the host
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = modeling.qwen_generation_config(tokenizer)
    # Qwen2.5-VL's own preprocessing (preprocessor_config.json: min_pixels 3136, max_pixels 12845056)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    return model.eval(), tokenizer, image_processor


def model_and_records(args, device, scratch):
    """(model, tokenizer, image_processor, records, description) for the flags given."""
    if args.qwen_3b_random:
        records = generated_records(scratch, args.questions, args.image_size, args.seed)
        model, tokenizer, image_processor = build_random_qwen_3b(records, device, args.qwen_layers)
        layers = f", only {args.qwen_layers} text layers / vision blocks" if args.qwen_layers else ""
        description = (f"Qwen2.5-VL-3B-Instruct architecture, RANDOM weights{layers}; special-token ids remapped to a "
                       f"small local tokenizer: only speed and memory are meaningful")
        return model, tokenizer, image_processor, records, description
    if args.random_tiny:
        records = generated_records(scratch, args.questions, args.image_size, args.seed)
        folder = tiny.build_random_tiny(Path(scratch) / "random-tiny", tiny.tokenizer_corpus(records), seed=args.seed,
                                        hidden=128, layers=4, heads=4, vision_hidden=128)
        description = "random-weight tiny Qwen2.5-VL (hidden 128, 4 layers, the tiny base's size)"
        return (*modeling.load(folder, device), records, description)
    records = synthetic_test_records(args.questions) if args.model == "tiny" else \
        generated_records(scratch, args.questions, args.image_size, args.seed)
    description = "tiny base model (warm-started)" if args.model == "tiny" else args.model
    return (*modeling.load(tiny.resolve_model(args.model), device), records, description)


# ----------------------------------------------------------------------------------------------
# 1. Sampler throughput: rollout.sample vs model.generate


def sample_ours(model, tokenizer, prompt, group_size, max_new_tokens, generator):
    """Answer tokens [B*G, T] from our sampler (prefill once per question, shared KV cache)."""
    out = rollout.sample(model, tokenizer, prompt, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                         generator=generator)
    return out.completion_ids


def sample_generate(model, prompt, group_size, max_new_tokens):
    """Answer tokens [B*G, T] from model.generate with the same sampling distribution as ours.

    top_k=0 and repetition_penalty=1.0 are given explicitly: otherwise generate would take them
    from the model's generation_config (top-k 50 by default; Qwen-Instruct ships top-k 1, penalty 1.05).
    """
    ids = model.generate(**prompt, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                         max_new_tokens=max_new_tokens, num_return_sequences=group_size)
    return ids[:, prompt["input_ids"].shape[1]:]  # generate returns prompt + answer


def measure_sampler(name, draw, eos_ids, repeats, device):
    """Warmup once, then `repeats` timed draws: median seconds and tokens/s, mean answer length."""
    reset_peak_memory(device)
    with torch.inference_mode():
        draw()  # warmup
        runs = []
        for _ in range(repeats):
            ids, seconds = timed(draw, device)
            lengths = count_answer_tokens(ids, eos_ids)  # [rows]
            runs.append((seconds, int(lengths.sum()), float(lengths.float().mean()), ids.shape[0]))
    return {
        "method": name,
        "rows": runs[0][3],
        "seconds": statistics.median(r[0] for r in runs),
        "tokens_per_second": statistics.median(r[1] / r[0] for r in runs),
        "mean_answer_length": statistics.mean(r[2] for r in runs),
        "peak_memory_gib": peak_memory_gib(device),
        "seconds_per_run": [r[0] for r in runs],
    }


def bench_sampler(model, tokenizer, prompt, args, device):
    eos_ids = rollout.eos_token_ids(model, tokenizer)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = []
    for G in GROUP_SIZES:
        torch.manual_seed(args.seed)  # generate samples from the global generator
        ours = measure_sampler("rollout.sample",
                               lambda: sample_ours(model, tokenizer, prompt, G, args.max_new_tokens, generator),
                               eos_ids, args.repeats, device)
        theirs = measure_sampler("model.generate", lambda: sample_generate(model, prompt, G, args.max_new_tokens),
                                 eos_ids, args.repeats, device)
        ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
        results += [dict(r, group_size=G, speedup_tokens_per_second=ratio) for r in (ours, theirs)]
    return results


def format_sampler(results, args):
    lines = [f"sampler: {args.questions} questions, up to {args.max_new_tokens} new tokens, "
             f"median of {args.repeats} run(s) after a warmup",
             f"{'G':>3}  {'method':<15}{'rows':>6}{'seconds':>10}{'tokens/s':>11}{'mean len':>10}{'peak GiB':>10}"]
    for r in results:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"{r['group_size']:>3}  {r['method']:<15}{r['rows']:>6}{r['seconds']:>10.3f}"
                     f"{r['tokens_per_second']:>11.1f}{r['mean_answer_length']:>10.2f}{peak:>10}")
    for r in results[::2]:
        lines.append(f"G={r['group_size']}: rollout.sample gives {r['speedup_tokens_per_second']:.2f}x "
                     f"the answer tokens/s of model.generate")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 2. Training-step split, from train.train_step's own timers

STEP_PARTS = [  # (train_step stat, label)
    ("seconds_rollout", "rollout"),
    ("seconds_policy_forward", "policy forward"),
    ("seconds_backward_and_step", "backward + AdamW step"),
    ("seconds_reference_forward", "reference forward"),
    ("seconds_fpl_hsr", "FPL + HSR"),
]
RULE_PARTS = [  # present only when a --train-flags rule runs them
    ("seconds_label_forward", "label-samples forward"),
    ("seconds_teacher", "EMA teacher rollout"),
    ("seconds_ema_update", "EMA teacher update"),
]


def train_step_args(bench_args):
    """train.py's flags for the measured step: G = 8, the bench's batch, then --train-flags (later wins)."""
    return train.parse_args(["--group-size", str(TRAIN_GROUP_SIZE), "--max-new-tokens", str(bench_args.max_new_tokens),
                             "--questions-per-step", str(bench_args.questions), "--seed", str(bench_args.seed),
                             *shlex.split(bench_args.train_flags)])


def bench_train_step(policy, tokenizer, image_processor, records, bench_args, device):
    args = train_step_args(bench_args)
    # train.py's recipe: fp32 master weights (bf16 compute by autocast), the reference in the compute dtype, and
    # with --ema-teacher an fp32 EMA copy, frozen as rules.ema_teacher.load makes it
    policy = policy.float()
    reference = (copy.deepcopy(policy).to(parallel.DTYPES[args.dtype]).eval().requires_grad_(False)
                 if args.kl_coef > 0 else None)
    teacher = copy.deepcopy(policy).eval().requires_grad_(False) if args.ema_teacher else None
    run = setup.make_run(args, policy, tokenizer, image_processor, reference, teacher, device, labelled=records)
    checkpointing = policy.is_activation_checkpointing
    step_records = run.labelled if rules.reads_labels(args) else [dict(r, answer=None) for r in records]

    def step():  # one step as train.train_loop runs it, the teacher's EMA update included
        stats, _ = train.train_step(run, step_records)
        if teacher is not None:
            t0 = parallel.clock(device)
            ema_teacher.ema_update(teacher, policy, ema_teacher.DEFAULT_START)  # its cost does not depend on the decay
            stats["seconds_ema_update"] = parallel.clock(device) - t0
        return stats

    reset_peak_memory(device)
    step()  # warmup
    runs = []
    for _ in range(bench_args.repeats):
        stats, seconds = timed(step, device)
        parts = {key: stats.get(key, 0.0) for key, _ in STEP_PARTS + RULE_PARTS}
        runs.append(dict(parts, seconds_other=seconds - sum(parts.values()), seconds_step=seconds))
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    share = {key: median[key] / median["seconds_step"] for key in median if key != "seconds_step"}
    teacher_gib = None if teacher is None else sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30
    return {"group_size": TRAIN_GROUP_SIZE, "questions": len(records), "gradient_checkpointing": checkpointing,
            "train_flags": bench_args.train_flags, "teacher_gib": teacher_gib,
            "kl_coef": args.kl_coef, "median_seconds": median, "share_of_step": share,
            "fpl_hsr_share": share["seconds_fpl_hsr"], "fpl_hsr_target": FPL_HSR_TARGET,
            "peak_memory_gib": peak_memory_gib(device), "runs": runs}


def format_train_step(result, args, device):
    med, share = result["median_seconds"], result["share_of_step"]
    lines = [f"training step: {result['questions']} questions x G={result['group_size']}, up to {args.max_new_tokens} "
             f"new tokens, median of {args.repeats} step(s) after a warmup",
             f"  {'part':<24}{'seconds':>10}{'% of step':>11}"]
    rule_parts = [(key, label) for key, label in RULE_PARTS if med[key] > 0]
    for key, label in STEP_PARTS + rule_parts + [("seconds_other", "other (untimed glue)")]:
        lines.append(f"  {label:<24}{med[key]:>10.3f}{100 * share[key]:>10.1f}%")
    lines.append(f"  {'step (wall)':<24}{med['seconds_step']:>10.3f}{100.0:>10.1f}%")
    if result["peak_memory_gib"] is not None:
        lines.append(f"  peak memory {result['peak_memory_gib']:.2f} GiB")
    if result["teacher_gib"] is not None:
        lines.append(f"  the EMA teacher holds {result['teacher_gib']:.3f} GiB (fp32, whole on every process)")
    verdict = "met" if result["fpl_hsr_share"] < FPL_HSR_TARGET else "NOT met"
    lines.append(f"FPL + HSR take {100 * result['fpl_hsr_share']:.1f}% of the step"
                 f" (target < {100 * FPL_HSR_TARGET:.0f}%: {verdict})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 3. Teacher-forced passes: each prompt encoded once for its G answers (shared prefix) or once per answer

PASS_GROUP_SIZE = 8
WIDE_IMAGE_SIZE = 532  # 38 x 38 patches -> 361 image tokens: a prompt of about 400 tokens, as a 512-pixel scan gives
WIDE_SIZES = dict(hidden=256, layers=4, heads=4, vision_hidden=128, vision_depth=2)
PASSES = [("unshared", rollout.completion_logits_and_hidden_unshared),
          ("shared", rollout.completion_logits_and_hidden_shared)]


def saved_for_backward(model, fn):
    """(fn(), bytes autograd keeps for backward, of which the language model's): the distinct storages its graph
    saves, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, in_language_model, language_model = {}, [False], model.model.language_model

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = (storage.nbytes(), in_language_model[0])
        return t

    hooks = [language_model.register_forward_pre_hook(lambda *_: in_language_model.__setitem__(0, True)),
             language_model.register_forward_hook(lambda *_: in_language_model.__setitem__(0, False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    finally:
        for hook in hooks:
            hook.remove()
    return result, sum(n for n, _ in saved.values()), sum(n for n, inside in saved.values() if inside)


def pass_answers(model, tokenizer, prompt, group_size, max_new_tokens, seed):
    """Sampled answers [B*G, T] (padded to T columns), the same for both passes."""
    out = rollout.sample(model, tokenizer, prompt, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                         generator=torch.Generator(device=prompt["input_ids"].device).manual_seed(seed))
    ids, mask = out.completion_ids, out.completion_mask
    missing = max_new_tokens - ids.shape[1]  # every row stopped early
    if missing:
        ids = torch.nn.functional.pad(ids, (0, missing), value=tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, missing), value=0)
    return ids, mask


def bench_passes(model, tokenizer, prompt, args, device):
    """Unshared vs shared teacher-forced pass: forward + backward and no-grad forward seconds (median of
    --repeats after a warmup), bytes saved for backward, peak memory on GPU; the ratios unshared / shared."""
    G = PASS_GROUP_SIZE
    ids, mask = pass_answers(model, tokenizer, prompt, G, args.max_new_tokens, args.seed)
    B, L = prompt["input_ids"].shape
    T = ids.shape[1]

    def forward_backward(fn):
        model.zero_grad(set_to_none=True)
        (logits, hidden), *saved = saved_for_backward(model, lambda: fn(model, prompt, ids, mask, G))
        (logits.mean() + hidden.float().mean()).backward()
        return logits.detach(), hidden.detach(), saved

    def forward(fn):
        with torch.no_grad():
            return fn(model, prompt, ids, mask, G)

    results, outputs = {}, {}
    for name, fn in PASSES:
        model.train()  # dropout is 0: the same numbers as eval, the training pass's code path
        reset_peak_memory(device)
        logits, hidden, (saved, saved_language_model) = forward_backward(fn)  # warmup; what it keeps for backward
        peak = peak_memory_gib(device)
        outputs[name] = (logits, hidden)
        train_seconds = statistics.median(timed(lambda: forward_backward(fn), device)[1] for _ in range(args.repeats))
        model.eval()
        forward(fn)  # warmup
        forward_seconds = statistics.median(timed(lambda: forward(fn), device)[1] for _ in range(args.repeats))
        model.zero_grad(set_to_none=True)
        results[name] = {"seconds_forward_backward": train_seconds, "seconds_forward_no_grad": forward_seconds,
                         "saved_for_backward_bytes": saved, "saved_for_backward_language_model_bytes":
                         saved_language_model, "peak_memory_gib": peak}
    results["tokens"] = {"unshared": B * G * (L + T), "shared": B * (L + G * T)}
    results["ratio_unshared_over_shared"] = {
        key: results["unshared"][key] / results["shared"][key]
        for key in ("seconds_forward_backward", "seconds_forward_no_grad", "saved_for_backward_bytes",
                    "saved_for_backward_language_model_bytes")}
    results["ratio_unshared_over_shared"]["tokens"] = results["tokens"]["unshared"] / results["tokens"]["shared"]
    real = mask.bool()  # the answer tokens the loss reads (padding after EOS is masked out of it)
    (logits_u, hidden_u), (logits_s, hidden_s) = outputs["unshared"], outputs["shared"]
    results["max_abs_difference"] = {"logits": (logits_u - logits_s).abs()[real].max().item(),
                                     "hidden": (hidden_u.float() - hidden_s.float()).abs()[real].max().item()}
    results["logits_scale"] = logits_u.abs()[real].max().item()
    results["finite"] = bool(torch.isfinite(logits_s).all() and torch.isfinite(hidden_s).all())
    results.update(questions=B, group_size=G, answer_tokens=T, prompt_tokens=L,
                   real_answer_tokens=int(mask.sum()), attention=model.config._attn_implementation)
    return results


def pass_setups(args, device, scratch):
    """(name, description, model, tokenizer, prompt) of the two --passes setups: the shipped tiny base model on
    the synthetic test split, and a wider random Qwen2.5-VL at a real prompt's length."""
    model, tokenizer, image_processor = modeling.load(tiny.resolve_model("tiny"), device)
    prompt = rollout.build_inputs(tokenizer, image_processor, synthetic_test_records(args.questions), device=device)
    yield "tiny", "shipped tiny base model (models/tiny-base-seed0), synthetic test questions", model, tokenizer, prompt
    del model
    records = generated_records(scratch, args.questions, WIDE_IMAGE_SIZE, args.seed)
    folder = tiny.build_random_tiny(Path(scratch) / "wide-random", tiny.tokenizer_corpus(records), seed=args.seed,
                                    image_size=WIDE_IMAGE_SIZE, **WIDE_SIZES)
    model, tokenizer, image_processor = modeling.load(folder, device)
    prompt = rollout.build_inputs(tokenizer, image_processor, records, device=device)
    sizes = ", ".join(f"{k} {v}" for k, v in WIDE_SIZES.items())
    yield ("wide", f"random Qwen2.5-VL ({sizes}), {WIDE_IMAGE_SIZE}x{WIDE_IMAGE_SIZE} noise images", model, tokenizer,
           prompt)


def format_passes(name, description, r, args, device):
    ratio, gib = r["ratio_unshared_over_shared"], 2**30
    lines = [f"teacher-forced pass, {name}: {description} | {device} | attention {r['attention']}",
             f"  {r['questions']} questions x G={r['group_size']}, prompt {r['prompt_tokens']} tokens (left-padded), "
             f"{r['answer_tokens']} answer tokens per row ({r['real_answer_tokens']} real); language-model tokens: "
             f"unshared {r['tokens']['unshared']}, shared {r['tokens']['shared']} ({ratio['tokens']:.2f}x fewer)",
             f"  {'pass':<10}{'fwd+bwd s':>11}{'fwd s (no grad)':>17}{'saved for bwd MiB':>19}"
             f"{'of which LM':>13}{'peak GiB':>10}"]
    for method in ("unshared", "shared"):
        m = r[method]
        peak = "-" if m["peak_memory_gib"] is None else f"{m['peak_memory_gib']:.2f}"
        lines.append(f"  {method:<10}{m['seconds_forward_backward']:>11.3f}{m['seconds_forward_no_grad']:>17.3f}"
                     f"{m['saved_for_backward_bytes'] / 2**20:>19.1f}"
                     f"{m['saved_for_backward_language_model_bytes'] / 2**20:>13.1f}{peak:>10}")
    freed = (r["unshared"]["saved_for_backward_bytes"] - r["shared"]["saved_for_backward_bytes"]) / gib
    lines.append(f"  unshared / shared: forward + backward {ratio['seconds_forward_backward']:.2f}x, no-grad forward "
                 f"{ratio['seconds_forward_no_grad']:.2f}x, bytes saved for backward "
                 f"{ratio['saved_for_backward_bytes']:.2f}x ({freed:.3f} GiB freed; the language model's "
                 f"{ratio['saved_for_backward_language_model_bytes']:.2f}x); max |difference| logits "
                 f"{r['max_abs_difference']['logits']:.1e}, hidden {r['max_abs_difference']['hidden']:.1e} "
                 f"(seconds: median of {args.repeats} after a warmup)")
    return "\n".join(lines)


def main_passes(args, device):
    """--passes: the teacher-forced pass with and without prefix sharing, on both setups, in one run."""
    results = {"setup": {"device": str(device), "torch": torch.__version__, "repeats": args.repeats,
                         "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    with tempfile.TemporaryDirectory(prefix="medevo-bench-") as scratch:
        for name, description, model, tokenizer, prompt in pass_setups(args, device, scratch):
            results[name] = dict(bench_passes(model, tokenizer, prompt, args, device), model=description)
            print(format_passes(name, description, results[name], args, device), flush=True)
            del model
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    modeling.disable_cudnn_attention()  # on CUDA: cuDNN SDPA's backward gives NaN gradients with our masks
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else modeling.default_device()
    torch.manual_seed(args.seed)
    if args.passes:
        return main_passes(args, device)
    with tempfile.TemporaryDirectory(prefix="medevo-bench-") as scratch:
        model, tokenizer, image_processor, records, description = model_and_records(args, device, scratch)
        print(modeling.apply_pixel_flags(image_processor, args.max_pixels, args.min_pixels, records))
        dtype = next(model.parameters()).dtype
        setup = {"model": description, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                 "attention": model.config._attn_implementation,
                 "parameters_billion": sum(p.numel() for p in model.parameters()) / 1e9,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "questions": args.questions, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                 "torch": torch.__version__, "cuda_launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING") == "1"}
        print(f"model: {description} | {setup['parameters_billion']:.3f}B parameters | {device} {setup['dtype']} "
              f"| attention {setup['attention']}" + (f" | {setup['gpu']}" if setup["gpu"] else ""), flush=True)
        results = {"setup": setup}
        if args.part in ("all", "sampler"):
            prompt = rollout.build_inputs(tokenizer, image_processor, records, device=device)  # built once, shared
            setup["prompt_tokens"] = int(prompt["input_ids"].shape[1])
            results["sampler"] = bench_sampler(model, tokenizer, prompt, args, device)
            print(format_sampler(results["sampler"], args), flush=True)
        if args.part in ("all", "train"):
            results["train_step"] = bench_train_step(model, tokenizer, image_processor, records, args, device)
            print(format_train_step(results["train_step"], args, device), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
