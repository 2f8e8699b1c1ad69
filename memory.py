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
  compute_copy     the full parameters gathered for the rollout: sampling gathers every layer once
                   for the whole rollout (unshard before, reshard after), so at that moment each
                   rank holds all of them in the compute dtype:
                     bfloat16: 2 B x n
                     float32:  4 B x n when sharded (the gathered fp32 copy),
                               0 when not sharded (the masters are the compute weights)
  reference        the frozen reference model, whole on each rank, in the compute dtype:
                   2 B x n for bfloat16, 4 B x n for float32; 0 without a reference (--kl-coef 0)
  total            the sum

Outside training's rollout the compute copy is smaller (FSDP2 gathers one block at a time in the
forward and backward passes), so `compute_copy` is the rollout's peak. NOT included, and said so
wherever the plan is printed: activations (and their gradient-checkpointing recomputation), the
rollout's KV cache, the logits, the CUDA context, NCCL buffers and allocator fragmentation. Hence a
run "fits" only if the total leaves a stated headroom for them: by default 20% of the GPU's memory
(16 GB of an 80 GB card). The headroom is our rule of thumb, not a measurement.

Units: GB = 1e9 bytes, GiB = 2**30 bytes. An "80 GB" H100 holds about 85.5e9 bytes, so comparing
against 80e9 errs on the safe side.

    python memory.py                                 # the README table: 3B and 7B on 1, 2, 4, 8 GPUs of 80 GB
    python memory.py --gpu-memory-gb 141 --sizes 7B --world-sizes 1 2 --freeze-vision
"""

import argparse

import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

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
PLAN_KEYS = ["master_weights", "gradients", "adamw_state", "compute_copy", "reference"]
LABELS = {"master_weights": "master weights", "gradients": "gradients", "adamw_state": "AdamW state",
          "compute_copy": "compute copy", "reference": "reference model"}
NOT_INCLUDED = "activations, KV cache and allocator overhead not included"


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


def memory_plan(n_params, n_trainable, world_size, dtype, sharded, reference):
    """Per-rank bytes of the run (the accounting of the module docstring), keys PLAN_KEYS + "total"."""
    if dtype not in BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(BYTES)}")
    shards = world_size if sharded else 1
    if dtype == "bfloat16":
        compute_copy = 2 * n_params
    else:
        compute_copy = 4 * n_params if sharded else 0
    plan = {
        "master_weights": 4 * n_params / shards,
        "gradients": 4 * n_trainable / shards,
        "adamw_state": 8 * n_trainable / shards,
        "compute_copy": compute_copy,
        "reference": BYTES[dtype] * n_params if reference else 0,
    }
    plan["total"] = sum(plan.values())
    return plan


def format_plan(plan, world_size, gib=True, dtype=None, sharded=None):
    """The plan as rank 0 prints it at start-up; dtype and sharded, when given, go in the header."""
    unit, scale = ("GiB", 2**30) if gib else ("GB", 1e9)
    setup = [f"{world_size} process" + ("es" if world_size != 1 else "")]
    if dtype is not None:
        setup.append(dtype)
    if sharded is not None:
        setup.append("FSDP2" if sharded else "full replica")
    parts = [f"{LABELS[key]} {plan[key] / scale:.1f} {unit}" for key in PLAN_KEYS]
    return (f"memory per rank ({', '.join(setup)}): " + ", ".join(parts[:3]) + ",\n  " + ", ".join(parts[3:])
            + f", total {plan['total'] / scale:.1f} {unit}; {NOT_INCLUDED}")


# ----------------------------------------------------------------------------------------------
# The README table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-rank memory plan of Med-Evo runs on Qwen2.5-VL (no download).")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--headroom", type=float, default=0.2,
                   help="share of the GPU's memory kept for activations, KV cache and allocator (default 0.2)")
    p.add_argument("--sizes", nargs="+", default=["3B", "7B"], choices=sorted(TEXT_CONFIGS))
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4, 8], help="GPUs (processes) per run")
    p.add_argument("--freeze-vision", action="store_true", help="train the language model only (as train.py's flag)")
    return p.parse_args(argv)


def table(args):
    """Markdown: bf16 recipe, reference model on; one GPU runs unsharded (a full replica), more run FSDP2."""
    budget = args.gpu_memory_gb * (1 - args.headroom)
    lines = [
        "| model | GPUs | sharding | master fp32 | grads fp32 | AdamW fp32 | bf16 compute | bf16 reference "
        f"| total per rank | left of {args.gpu_memory_gb:g} GB | fits (total <= {budget:g} GB)? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {}
    for size in args.sizes:
        model = meta_model(size)
        if args.freeze_vision:
            model.model.visual.requires_grad_(False)
        counts[size] = count_parameters(model)
        for world_size in args.world_sizes:
            sharded = world_size > 1
            plan = memory_plan(counts[size]["total"], counts[size]["trainable"], world_size, "bfloat16",
                               sharded, reference=True)
            cells = [f"{plan[key] / 1e9:.1f}" for key in PLAN_KEYS]
            total = plan["total"] / 1e9
            cells += [f"**{total:.1f} GB** ({plan['total'] / 2**30:.1f} GiB)", f"{args.gpu_memory_gb - total:.1f}",
                      "fits" if total <= budget else "does not fit"]
            lines.append(f"| Qwen2.5-VL-{size} | {world_size} | {'FSDP2' if sharded else 'none'} | "
                         + " | ".join(cells) + " |")
    params = "; ".join(f"Qwen2.5-VL-{size}: {c['total']:,} parameters, {c['trainable']:,} trainable"
                       for size, c in counts.items())
    return "\n".join(lines) + (f"\n\nComponents in GB (1e9 bytes) per rank; {NOT_INCLUDED}.\n{params}.\n"
                               f"Fits = total <= {budget:g} GB: {args.headroom:.0%} of the GPU "
                               f"({args.gpu_memory_gb * args.headroom:g} GB) is kept for what the plan leaves out.")


def main(argv=None):
    print(table(parse_args(argv)))


if __name__ == "__main__":
    main()
