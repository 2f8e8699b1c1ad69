"""Memory plan: the per-rank bytes of a Med-Evo GRPO run with FSDP2, before any weight is loaded.

Med-Evo (arXiv 2603.07443) fine-tunes the whole Qwen2.5-VL policy with GRPO and keeps a frozen
reference model for the KL term. Whether a run fits on a GPU is decided mostly by bytes per
parameter, so this file counts them from the real configurations, built on the meta device (no
download, no memory), for the recipe train.py runs. The paper does not discuss memory; the plan is
ours. Per rank, with n = all parameters, t = trainable ones, W = world size and s = W when the policy
is sharded with FSDP2 (`fully_shard`), s = 1 when every rank holds a full replica:

  master_weights   4 B x n / s    fp32 master weights (AdamW updates these, in every --dtype)
  gradients        4 B x t / s    fp32 gradients (FSDP2 reduces them in fp32: reduce_dtype=float32)
  adamw_state      8 B x t / s    exp_avg + exp_avg_sq, fp32
                   with --offload these three live in host memory (FSDP2 CPUOffloadPolicy): 0 on the GPU
  compute_copy     the full parameters gathered for the rollout: sampling gathers every layer once
                   for the whole rollout (unshard before, reshard after), so at that moment each
                   rank holds all of them in the compute dtype:
                     bfloat16: 2 B x n
                     float32:  4 B x n when sharded (the gathered fp32 copy),
                               0 when not sharded (the masters are the compute weights)
  reference        the frozen reference model in the compute dtype, sharded like the policy:
                   2 B x n / s for bfloat16, 4 B x n / s for float32; 0 without a reference (--kl-coef 0)
  activations      an estimate for the longest prompt (L tokens, its image at the --max-pixels cap), the
                   largest of three moments that never overlap (`activation_plan`):
                     teacher-forced pass with gradients, Q = questions per rank, each one packed row of
                     S = L + G T tokens (rollout.completion_logits_and_hidden: the prompt once, then its G
                     answers of T tokens), so the language model holds Q S tokens, not Q G (L + T):
                       gradient checkpointing: every decoder layer's input (Q S D) plus one layer recomputed
                       (Q S a, a = 9 D + 4 kv + 4 I elements per token: the two RMSNorms, q k v and the
                       rotated q k, attention output, MLP gate / up / product); the vision tower alike per
                       question (4 patches per image token); without checkpointing every layer's Q S a;
                       plus the final norm's fp32 input (Q S D), the fp32 answer logits and their gradient
                       (Q G T V), and the attention mask: Q S^2 bytes (bool) and the additive copy in the
                       compute dtype that SDPA makes of it in every layer and keeps for backward (one layer's
                       with checkpointing, every layer's without).
                     On a GPU this frees (G - 1) L tokens per question: for a 512 x 512 image (L = 388),
                     G = 8, T = 16, 516 tokens instead of 3232, 6.3x less for the language model: for
                     Qwen2.5-VL-7B with checkpointing, 8 questions on one GPU, its activations take 1.7 GB instead
                     of 10.9 GB and the whole teacher-forced estimate 4.5 GB instead of 14.0 GB (the masks: 6 MB).
                     With flash-attention (no 4-D mask) the pass repeats the prompt per answer:
                     activation_plan(..., shared_prefix=False) counts that layout, with no S^2 mask.
                     rollout: the KV cache of questions x N label samples rows (2 kv per layer per token);
                     evaluation: the KV cache of --eval-batch-size rows.
  total            the sum of the above (GPU)

Host memory per node (`host_plan`): the larger of two moments. Loading: rank 0 reads one full fp32 copy
(4 B x n; the other ranks receive their shards, parallel.load_sharded) while, with --offload, each local rank's
masters arrive. Training, with --offload: each local rank's offloaded masters, gradients and AdamW state, plus the
pinned allocator's power-of-two rounding of the masters and gradients (`pinned_rounding_bytes`). Process overhead
(Python, CUDA context, pinned staging) is not in it.

Outside training's rollout the compute copy is smaller (FSDP2 gathers one block at a time in the
forward and backward passes), so `compute_copy` is the rollout's peak. NOT included, and said so
wherever the plan is printed: the CUDA context, NCCL buffers, allocator fragmentation, and whatever
the activation estimate misses. Hence a run "fits" only if the total leaves a stated headroom for them:
by default 10% of the GPU's memory (8 GB of an 80 GB card). The headroom and the activation estimate
are ours, not measurements (no GPU has run this code yet).

Units: GB = 1e9 bytes, GiB = 2**30 bytes. An "80 GB" H100 holds about 85.5e9 bytes, so comparing
against 80e9 errs on the safe side.

    python -m scale.memory                                 # docs/scale.md tables: 3B and 7B on 1, 2, 4, 8 GPUs of 80 GB
    python -m scale.memory --image-pixels 4194304          # every image at the default --max-pixels cap
    python -m scale.memory --gpu-memory-gb 141 --sizes 7B --world-sizes 1 2 --freeze-vision
"""

import argparse
import math
import os

import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import rollout
from scale import parallel

# ----------------------------------------------------------------------------------------------
# The real Qwen2.5-VL configurations (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct, written out)

# Qwen's special-token ids (the real tokenizer's).
QWEN_TOKEN_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}

TEXT_CONFIGS = {
    "3B": dict(hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_window_layers=70),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28),
}

VISION_DEPTH = 32
FULL_ATTENTION_BLOCKS = [7, 15, 23, 31]  # the vision blocks with full attention; the others use 112-pixel windows

BYTES = {"float32": 4, "bfloat16": 2}
STATE_KEYS = ["master_weights", "gradients", "adamw_state"]
PLAN_KEYS = [*STATE_KEYS, "compute_copy", "reference", "activations"]
LABELS = {"master_weights": "master weights", "gradients": "gradients", "adamw_state": "AdamW state",
          "compute_copy": "compute copy", "reference": "reference model", "activations": "activations (estimate)",
          "teacher": "EMA teacher (fp32)"}
NOT_INCLUDED = "CUDA context, NCCL buffers and allocator overhead not included"
PATCHES_PER_TOKEN = 4  # 2 x 2 patches of 14 pixels merge into one token
TEXT_TOKENS = 64  # the chat template, a question and the answer instruction (docs/scale.md tables)


def qwen25_vl_config(size, layers=0, token_ids=None):
    """Qwen2.5-VL-{size}-Instruct's configuration; layers > 0 keeps that many text layers and vision blocks.

    token_ids maps the special tokens of QWEN_TOKEN_IDS to ids (e.g. a small local tokenizer's); by default
    Qwen's own.
    """
    if size not in TEXT_CONFIGS:
        raise ValueError(f"size {size!r}: expected one of {sorted(TEXT_CONFIGS)}")
    ids = {**QWEN_TOKEN_IDS, **(token_ids or {})}
    text = dict(TEXT_CONFIGS[size])
    tie = text["tie_word_embeddings"]
    vision_depth = VISION_DEPTH
    full_attention = FULL_ATTENTION_BLOCKS
    if layers:
        text["num_hidden_layers"] = vision_depth = layers
        full_attention = [i for i in FULL_ATTENTION_BLOCKS if i < layers] or [layers - 1]
    return Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            hidden_act="silu",
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            use_sliding_window=False,
            sliding_window=32768,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            hidden_act="silu",
            in_channels=3,
            out_hidden_size=text["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=full_attention,
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def meta_model(size, layers=0):
    """The Qwen2.5-VL model class built on the meta device: real shapes, no storage, nothing downloaded."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(qwen25_vl_config(size, layers))


# ----------------------------------------------------------------------------------------------
# Parameter counts and the plan


def count_parameters(model):
    """{"total", "trainable"} parameter counts; a weight shared by two modules (tied embeddings) counts once."""
    distinct = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values()
    return {"total": sum(p.numel() for p in distinct),
            "trainable": sum(p.numel() for p in distinct if p.requires_grad)}


def memory_plan(n_params, n_trainable, world_size, dtype, sharded, reference, offload=False, activations=0,
                teacher=False):
    """Per-rank GPU bytes of the run (the accounting of the module docstring), keys PLAN_KEYS + "total", and
    "host_offload": the bytes this rank keeps in host memory with --offload (0 without). teacher (--ema-teacher):
    key "teacher" too, the EMA teacher's fp32 weights, sharded like the masters (rules/ema_teacher.py: in bf16
    the EMA would not move)."""
    if dtype not in BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(BYTES)}")
    if offload and not sharded:
        raise ValueError("offload is FSDP2's: it needs sharded=True")
    shards = world_size if sharded else 1
    if dtype == "bfloat16":
        compute_copy = 2 * n_params
    else:
        compute_copy = 4 * n_params if sharded else 0
    states = {"master_weights": 4 * n_params / shards, "gradients": 4 * n_trainable / shards,
              "adamw_state": 8 * n_trainable / shards}
    plan = {
        **({key: 0 for key in states} if offload else states),
        "compute_copy": compute_copy,
        "reference": BYTES[dtype] * n_params / shards if reference else 0,
        "activations": activations,
        **({"teacher": 4 * n_params / shards} if teacher else {}),
    }
    plan["total"] = sum(plan.values())
    plan["host_offload"] = sum(states.values()) if offload else 0
    return plan


def model_dims(config):
    """The sizes the activation estimate needs, from a Qwen2.5-VL configuration."""
    text, vision = config.text_config, config.vision_config
    return {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "intermediate": text.intermediate_size,
            "kv": text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
            "vocab": text.vocab_size, "vision_hidden": vision.hidden_size, "vision_depth": vision.depth,
            "vision_intermediate": vision.intermediate_size}


def activation_plan(dims, prompt_tokens, image_tokens, questions, group_size, label_samples, new_tokens,
                    eval_batch, checkpointing, dtype="bfloat16", shared_prefix=True):
    """Activation bytes of one rank at the three moments of a step (module docstring), and their peak.

    prompt_tokens: the longest prompt (image tokens included); image_tokens: its image's tokens;
    questions: questions per rank per step; the rest as train.py's flags. shared_prefix: the teacher-forced
    pass encodes each prompt once (sdpa / eager attention); False: once per answer (flash-attention).
    """
    b, d = BYTES[dtype], dims
    rows, seq = questions * group_size, prompt_tokens + new_tokens
    if shared_prefix:  # one packed row per question: [prompt | answer 1 | ... | answer G]
        packed = prompt_tokens + group_size * new_tokens
        tokens = questions * packed
        copies = 1 if checkpointing else d["layers"]  # the compute-dtype mask SDPA makes and keeps, per layer
        mask = questions * packed**2 * (1 + b * copies)
    else:  # each prompt repeated for its G answers, a padding mask only
        tokens, mask = rows * seq, 0
    layer = 9 * d["hidden"] + 4 * d["kv"] + 4 * d["intermediate"]  # elements saved per token by one layer
    vision_layer = 13 * d["vision_hidden"] + 4 * d["vision_intermediate"]  # no grouped kv in the vision tower
    patches = questions * PATCHES_PER_TOKEN * image_tokens
    if checkpointing:
        text = tokens * b * (d["layers"] * d["hidden"] + layer)
        vision = patches * b * (d["vision_depth"] * d["vision_hidden"] + vision_layer)
    else:
        text = tokens * b * d["layers"] * layer
        vision = patches * b * d["vision_depth"] * vision_layer
    head = tokens * d["hidden"] * 4 + 2 * rows * new_tokens * d["vocab"] * 4  # final norm fp32, logits + grad
    kv_per_row = seq * d["layers"] * 2 * d["kv"] * b
    plan = {"teacher_forced": text + vision + head + mask, "rollout": questions * label_samples * kv_per_row,
            "evaluation": eval_batch * kv_per_row}
    plan["peak"] = max(plan.values())
    return plan


def host_plan(n_params, plan, ranks_per_node, pinned_rounding=0):
    """Peak host bytes on the busiest node, the larger of two moments:
      loading:  rank 0's full fp32 copy (sent tensor by tensor) while the local ranks' offloaded masters fill in
                (4 of the 16 offloaded bytes per parameter; AdamW's state does not exist yet);
      training: every local rank's offloaded masters, gradients and AdamW state, plus the pinned allocator's
                rounding of the masters and gradients (pinned_rounding_bytes)."""
    offload = plan["host_offload"]
    rounding = pinned_rounding if offload else 0
    loading = 4 * n_params + ranks_per_node * (offload / 4 + rounding / 2)
    return max(loading, ranks_per_node * (offload + rounding))


def pinned_rounding_bytes(model, world_size, threshold_mb=parallel.PINNED_ROUND_THRESHOLD_MB):
    """Bytes the CUDA caching host allocator adds to one rank's pinned offload: FSDP2 pins each parameter's fp32
    shard (the master, then its gradient) as its own block, and the allocator rounds a block up to a power of two
    when it is at most `threshold_mb` (pinned_max_round_threshold_mb; unbounded by default, ATen's
    CachingHostAllocator.h; train.py bounds it, parallel.bound_pinned_rounding). Shards are dim-0 slices padded
    to equal size, ceil(dim0 / world_size) rows. AdamW's state is allocated by the optimizer, not pinned."""
    limit = None if threshold_mb is None else threshold_mb * 2**20
    extra = 0
    for p in model.parameters():
        rows = -(-p.shape[0] // world_size) if p.dim() else 1
        size = rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * 4
        if size and (limit is None or size <= limit):
            extra += 2 * ((1 << (size - 1).bit_length()) - size)  # master + gradient
    return extra


def image_tokens_at(pixels):
    """Tokens of a square image of `pixels` pixels after Qwen2.5-VL's resizing with that cap (28-pixel tokens)."""
    side = math.isqrt(pixels)
    height, width = smart_resize(side, side, factor=28, min_pixels=56 * 56, max_pixels=pixels)
    return (height // 28) * (width // 28)


def run_plan(model, args, world_size, sharded, reference, prompt_tokens, image_tokens):
    """The start-up plan of a train.py run (its flags in `args`) for its longest prompt, as printed text."""
    questions = args.questions_per_step // world_size
    shared = args.group_size > 1 and rollout.shared_prefix_refusal(model) is None  # the teacher-forced layout
    acts = activation_plan(model_dims(model.config), prompt_tokens, image_tokens, questions, args.group_size,
                           args.label_samples, args.max_new_tokens, args.eval_batch_size, args.gradient_checkpointing,
                           args.dtype, shared_prefix=shared)
    counts = count_parameters(model)
    plan = memory_plan(counts["total"], counts["trainable"], world_size, args.dtype, sharded, reference, args.offload,
                       acts["peak"], teacher=args.ema_teacher)
    host = host_plan(counts["total"], plan, min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
                     pinned_rounding_bytes(model, world_size) if args.offload else 0)
    return format_plan(plan, world_size, dtype=args.dtype, sharded=sharded, host=host) + (
        f"\n  activations for the longest prompt ({prompt_tokens} tokens, {image_tokens} of them image): "
        + ", ".join(f"{key.replace('_', '-')} {acts[key] / 2**30:.2f} GiB" for key in ("teacher_forced", "rollout",
                                                                                      "evaluation")))


def format_plan(plan, world_size, gib=True, dtype=None, sharded=None, host=None):
    """The plan as rank 0 prints it at start-up; dtype, sharded and host bytes per node, when given, too."""
    unit, scale = ("GiB", 2**30) if gib else ("GB", 1e9)
    setup = [f"{world_size} process" + ("es" if world_size != 1 else "")]
    if dtype is not None:
        setup.append(dtype)
    if sharded is not None:
        setup.append("FSDP2" if sharded else "full replica")
    if plan["host_offload"]:
        setup.append("offload")
    parts = [f"{LABELS[key]} {plan[key] / scale:.1f} {unit}" for key in PLAN_KEYS + ["teacher"] if key in plan]
    text = (f"memory per rank ({', '.join(setup)}): " + ", ".join(parts[:3]) + ",\n  " + ", ".join(parts[3:])
            + f", total {plan['total'] / scale:.1f} {unit} on the GPU; {NOT_INCLUDED}")
    if host is not None:
        text += f"\n  host memory per node: {host / scale:.1f} {unit} (rank 0's full fp32 copy while loading"
        offloaded = plan["host_offload"] / scale
        text += f", plus {offloaded:.1f} {unit} offloaded per rank)" if offloaded else ")"
    return text


# ----------------------------------------------------------------------------------------------
# The tables of docs/scale.md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-rank memory plan of Med-Evo runs on Qwen2.5-VL (no download).")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the GPU's memory kept for the CUDA context, NCCL and the allocator (default 0.1)")
    p.add_argument("--sizes", nargs="+", default=["3B", "7B"], choices=sorted(TEXT_CONFIGS))
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4, 8], help="GPUs (processes) per run")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the host memory per node")
    p.add_argument("--host-memory-gib", type=float, default=128.0, help="host memory per node, GiB: the table marks "
                                                                       "the setups over it")
    p.add_argument("--freeze-vision", action="store_true", help="train the language model only (as train.py's flag)")
    p.add_argument("--image-pixels", type=int, default=512 * 512,
                   help="pixels of the longest prompt's image (default 512 x 512, SLAKE's size)")
    p.add_argument("--questions-per-step", type=int, default=8, help="as train.py's flag (over all ranks)")
    p.add_argument("--group-size", type=int, default=8, help="as train.py's flag")
    p.add_argument("--max-new-tokens", type=int, default=16, help="as train.py's flag")
    p.add_argument("--eval-batch-size", type=int, default=32, help="as train.py's flag")
    return p.parse_args(argv)


def run_activations(dims, args, world_size):
    """activation_plan for the table's run: a square image of --image-pixels, TEXT_TOKENS of text, checkpointing."""
    image = image_tokens_at(args.image_pixels)
    questions = max(1, args.questions_per_step // world_size)
    return activation_plan(dims, image + TEXT_TOKENS, image, questions, args.group_size, args.group_size,
                           args.max_new_tokens, args.eval_batch_size, checkpointing=True)


def table(args):
    """Markdown: bf16 recipe, reference model on, gradient checkpointing; one GPU runs unsharded (a full replica)
    unless offloaded, more run FSDP2; with and without --offload."""
    budget = args.gpu_memory_gb * (1 - args.headroom)
    lines = [
        "| model | GPUs | setup | master + grads + AdamW fp32 | bf16 compute | bf16 reference | activations "
        f"| total per GPU | fits (<= {budget:g} GB)? | host per node |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {}
    for size in args.sizes:
        model = meta_model(size)
        if args.freeze_vision:
            model.model.visual.requires_grad_(False)
        counts[size] = count_parameters(model)
        dims = model_dims(model.config)
        for world_size in args.world_sizes:
            for offload in (False, True):
                sharded = world_size > 1 or offload
                acts = run_activations(dims, args, world_size)
                plan = memory_plan(counts[size]["total"], counts[size]["trainable"], world_size, "bfloat16",
                                   sharded, reference=True, offload=offload, activations=acts["peak"])
                rounding = pinned_rounding_bytes(model, world_size) if offload else 0
                host = host_plan(counts[size]["total"], plan, min(world_size, args.gpus_per_node), rounding)
                unbounded = host_plan(counts[size]["total"], plan, min(world_size, args.gpus_per_node),
                                      pinned_rounding_bytes(model, world_size, None) if offload else 0)
                states = sum(plan[key] for key in STATE_KEYS)
                setup = ("FSDP2" if sharded else "one replica") + (" + offload" if offload else "")
                total = plan["total"] / 1e9
                cells = [f"{states / 1e9:.1f}" if not offload else f"0 (host {plan['host_offload'] / 1e9:.1f})",
                         f"{plan['compute_copy'] / 1e9:.1f}", f"{plan['reference'] / 1e9:.1f}",
                         f"{plan['activations'] / 1e9:.1f}", f"**{total:.1f} GB**",
                         "fits" if total <= budget else "does not fit", f"{host / 1e9:.0f} GB" + (
                             f" ({unbounded / 1e9:.0f} unbounded)" if offload else "") + (
                             "" if host <= args.host_memory_gib * 2**30 else f", over {args.host_memory_gib:g} GiB")]
                lines.append(f"| Qwen2.5-VL-{size} | {world_size} | {setup} | " + " | ".join(cells) + " |")
    params = "; ".join(f"Qwen2.5-VL-{size}: {c['total']:,} parameters, {c['trainable']:,} trainable"
                       for size, c in counts.items())
    image = image_tokens_at(args.image_pixels)
    return "\n".join(lines) + (
        f"\n\nGB (1e9 bytes) per GPU. Activations: estimate for a {image}-token image ({args.image_pixels:,} pixels) "
        f"+ {TEXT_TOKENS} text tokens, {args.questions_per_step} questions per step over the GPUs, "
        f"G = {args.group_size}, {args.max_new_tokens} new tokens, evaluation batch {args.eval_batch_size}, "
        f"gradient checkpointing, each prompt encoded once for its G answers (sdpa).\n{params}.\n"
        f"Fits = total <= {budget:g} GB: {args.headroom:.0%} of the GPU ({args.gpu_memory_gb * args.headroom:g} GB) "
        f"is kept for the {NOT_INCLUDED.replace(' not included', '')}. Host per node: the peak of loading (rank 0's "
        f"fp32 copy as the masters arrive) and training (the offloaded states of {args.gpus_per_node} GPUs per node "
        f"at most), with the pinned allocator's "
        f"power-of-two rounding bounded to blocks <= {parallel.PINNED_ROUND_THRESHOLD_MB} MiB as train.py sets it "
        f"(in brackets: unbounded, torch's default).")


def main(argv=None):
    print(table(parse_args(argv)))


if __name__ == "__main__":
    main()
