"""Tests for memory.py: the plan against hand-computed bytes, parameter counts of meta-device models."""

import os

import pytest
import torch
from transformers import AutoModelForImageTextToText

from scale import memory, parallel

# ----------------------------------------------------------------------------------------------
# The plan, by hand: n = 1000 parameters, t = 600 trainable, 4 processes


N, T, W = 1000, 600, 4


@pytest.mark.parametrize("dtype, sharded, reference, expected", [
    # master 4n/4, grads 4t/4, AdamW 8t/4, bf16 compute 2n, bf16 reference 2n/4 (sharded like the policy)
    ("bfloat16", True, True, [1000, 600, 1200, 2000, 500]),
    ("bfloat16", True, False, [1000, 600, 1200, 2000, 0]),
    # unsharded: master 4n, grads 4t, AdamW 8t, bf16 compute 2n, reference 2n
    ("bfloat16", False, True, [4000, 2400, 4800, 2000, 2000]),
    ("bfloat16", False, False, [4000, 2400, 4800, 2000, 0]),
    # fp32 sharded: the gathered fp32 copy 4n, fp32 reference 4n/4
    ("float32", True, True, [1000, 600, 1200, 4000, 1000]),
    ("float32", True, False, [1000, 600, 1200, 4000, 0]),
    # fp32 unsharded: the masters are the compute weights, no copy
    ("float32", False, True, [4000, 2400, 4800, 0, 4000]),
    ("float32", False, False, [4000, 2400, 4800, 0, 0]),
])
def test_memory_plan_hand_computed(dtype, sharded, reference, expected):
    plan = memory.memory_plan(N, T, W, dtype, sharded, reference, activations=7)
    assert [plan[key] for key in memory.PLAN_KEYS] == expected + [7]
    assert plan["total"] == sum(expected) + 7 and plan["host_offload"] == 0
    assert set(plan) == {*memory.PLAN_KEYS, "total", "host_offload"}


def test_offload_moves_the_fp32_states_to_the_host():
    plan = memory.memory_plan(N, T, W, "bfloat16", True, True, offload=True)
    assert [plan[key] for key in memory.PLAN_KEYS] == [0, 0, 0, 2000, 500, 0]
    assert plan["host_offload"] == 1000 + 600 + 1200 and plan["total"] == 2500
    # the larger of loading (rank 0's fp32 copy + 4 ranks' masters, 700 each) and training (4 ranks' 2800 each)
    assert memory.host_plan(N, plan, ranks_per_node=4) == max(4 * N + 4 * 700, 4 * 2800)
    assert memory.host_plan(N, plan, ranks_per_node=4, pinned_rounding=100) == max(4 * N + 4 * 750, 4 * 2900)
    with pytest.raises(ValueError, match="sharded"):
        memory.memory_plan(N, T, 1, "bfloat16", False, True, offload=True)


def test_the_ema_teacher_adds_fp32_weights_sharded_like_the_masters():
    plan = memory.memory_plan(N, T, W, "bfloat16", True, True, teacher=True)
    assert plan["teacher"] == 4 * N / W == plan["master_weights"]  # 1000
    assert plan["total"] == memory.memory_plan(N, T, W, "bfloat16", True, True)["total"] + 1000
    assert "EMA teacher (fp32) 0.0 GiB" in memory.format_plan(plan, W)


def test_memory_plan_one_process_sharded_equals_unsharded_in_bf16():
    assert memory.memory_plan(N, T, 1, "bfloat16", True, True) == memory.memory_plan(N, T, 1, "bfloat16", False, True)
    with pytest.raises(ValueError, match="float16"):
        memory.memory_plan(N, T, 1, "float16", True, True)


def test_format_plan_says_what_is_left_out():
    plan = memory.memory_plan(2**30, 2**30, 4, "bfloat16", True, True)
    text = memory.format_plan(plan, 4, dtype="bfloat16", sharded=True, host=2**32)
    assert text.startswith("memory per rank (4 processes, bfloat16, FSDP2): master weights 1.0 GiB, gradients 1.0 GiB")
    assert "total 6.5 GiB" in text and "allocator overhead not included" in text
    assert "host memory per node: 4.0 GiB" in text
    assert "GB" in memory.format_plan(plan, 4, gib=False) and "GiB" not in memory.format_plan(plan, 4, gib=False)


# ----------------------------------------------------------------------------------------------
# Activations, by hand


DIMS = {"hidden": 10, "layers": 3, "intermediate": 20, "kv": 4, "vocab": 100, "vision_hidden": 6, "vision_depth": 2,
        "vision_intermediate": 8}


def test_activation_plan_hand_computed():
    """1 question per rank, G = 2, N = 3, prompt 50 tokens of which 8 image tokens, 5 new tokens, eval batch 4.

    The teacher-forced pass packs each question into one row [prompt | answer 1 | answer 2] of 50 + 2 x 5 = 60
    tokens (rollout.completion_logits_and_hidden_shared) under a 60 x 60 mask; shared_prefix=False counts the
    prompt repeated per answer, 2 rows of 55 tokens (the numbers this test expected before prefix sharing)."""
    plan = memory.activation_plan(DIMS, 50, 8, 1, 2, 3, 5, 4, checkpointing=True)
    tokens, layer = 60, 9 * 10 + 4 * 4 + 4 * 20
    text = tokens * 2 * (3 * 10 + layer)  # each layer's input + one layer recomputed, bf16
    vision = 32 * 2 * (2 * 6 + 13 * 6 + 4 * 8)  # 4 patches per image token
    head = tokens * 10 * 4 + 2 * 2 * 5 * 100 * 4  # final norm's fp32 input over the packed row; 2 rows of fp32 logits
    mask = 60 * 60 * (1 + 2)  # bool, plus one layer's bf16 copy (checkpointing)
    kv = 55 * 3 * 2 * 4 * 2  # the rollout's KV cache: a prompt and one answer per row
    assert plan == {"teacher_forced": text + vision + head + mask, "rollout": 3 * kv, "evaluation": 4 * kv,
                    "peak": max(text + vision + head + mask, 3 * kv, 4 * kv)}
    full = memory.activation_plan(DIMS, 50, 8, 1, 2, 3, 5, 4, checkpointing=False)
    assert full["teacher_forced"] == (tokens * 2 * 3 * layer + 32 * 2 * 2 * (13 * 6 + 4 * 8) + head
                                      + 60 * 60 * (1 + 2 * 3))  # every layer's bf16 copy of the mask

    # the prompt repeated for each answer (flash-attention): 2 rows of 55 tokens, no 4-D mask
    unshared = memory.activation_plan(DIMS, 50, 8, 1, 2, 3, 5, 4, checkpointing=True, shared_prefix=False)
    rows, seq = 2, 55
    text = rows * seq * 2 * (3 * 10 + layer)
    head = rows * seq * 10 * 4 + 2 * rows * 5 * 100 * 4
    assert unshared == {"teacher_forced": text + vision + head, "rollout": 3 * kv, "evaluation": 4 * kv,
                        "peak": max(text + vision + head, 3 * kv, 4 * kv)}
    full = memory.activation_plan(DIMS, 50, 8, 1, 2, 3, 5, 4, checkpointing=False, shared_prefix=False)
    assert full["teacher_forced"] == rows * seq * 2 * 3 * layer + 32 * 2 * 2 * (13 * 6 + 4 * 8) + head


def test_shared_prefix_frees_the_repeated_prompts():
    """Qwen2.5-VL-7B, a 512 x 512 image (324 tokens) + 64 text tokens, 8 questions, G = 8, T = 16, checkpointing:
    the language model holds 8 x (388 + 128) tokens instead of 8 x 8 x (388 + 16)."""
    dims = memory.model_dims(memory.meta_model("7B").config)
    args = (dims, 388, 324, 8, 8, 8, 16, 32, True)
    shared, unshared = memory.activation_plan(*args), memory.activation_plan(*args, shared_prefix=False)
    per_token = 2 * (28 * 3584 + 9 * 3584 + 4 * 512 + 4 * 18944)  # bf16, checkpointing
    freed = 8 * (8 * 404 - 516) * (per_token + 3584 * 4)  # the language model's and the final norm's
    assert unshared["teacher_forced"] - shared["teacher_forced"] == freed - 8 * 516**2 * 3
    assert 13.9e9 < unshared["teacher_forced"] < 14.1e9 and 4.4e9 < shared["teacher_forced"] < 4.6e9


def test_image_tokens_at_the_cap():
    assert memory.image_tokens_at(512 * 512) == 18 * 18  # 512 -> 504 = 18 x 28
    assert memory.image_tokens_at(4194304) == 73 * 73


# ----------------------------------------------------------------------------------------------
# Parameter counts on the meta device


def test_count_parameters_tiny_meta_model_counts_tied_weights_once():
    config = memory.qwen25_vl_config("3B")
    config.text_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=151936))
    config.vision_config.update(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                     fullatt_block_indexes=[1]))
    config.text_config.rope_parameters["mrope_section"] = [4, 2, 2]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied, as Qwen's 3B
    distinct = {id(p): p for p in model.parameters()}.values()
    assert memory.count_parameters(model) == {"total": sum(p.numel() for p in distinct),
                                              "trainable": sum(p.numel() for p in distinct)}
    # the shared matrix once: counting both modules' weights would add vocab x hidden
    per_module = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    assert per_module == memory.count_parameters(model)["total"] + 151936 * 64
    model.model.visual.requires_grad_(False)
    counts = memory.count_parameters(model)
    assert counts["trainable"] == counts["total"] - sum(p.numel() for p in model.model.visual.parameters())


@pytest.mark.parametrize("size, public, exact", [("3B", 3.75e9, 3_754_622_976), ("7B", 8.29e9, 8_292_166_656)])
def test_real_configurations_match_public_parameter_counts(size, public, exact):
    counts = memory.count_parameters(memory.meta_model(size))
    assert counts["total"] == counts["trainable"] == exact
    assert abs(exact - public) / public < 0.01  # Hugging Face lists 3.75B and 8.29B


def test_config_layers_and_token_ids():
    config = memory.qwen25_vl_config("7B", layers=2, token_ids={"<|image_pad|>": 7})
    assert config.text_config.num_hidden_layers == config.vision_config.depth == 2
    assert config.vision_config.fullatt_block_indexes == [1]
    assert config.image_token_id == 7 and config.video_token_id == 151656
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size == 3584
    assert not config.tie_word_embeddings and memory.qwen25_vl_config("3B").tie_word_embeddings


def test_pinned_rounding_hand_computed():
    """Linear(3, 5) over 2 ranks: the weight's shard is ceil(5 / 2) = 3 rows x 3 x 4 B = 36 B, pinned as 64 (+28);
    the bias's 3 x 4 B = 12 B as 16 (+4); masters and gradients both: 2 x 32 = 64 B. Bounded to blocks <= 0 MiB,
    nothing is rounded."""
    layer = torch.nn.Linear(3, 5)
    assert memory.pinned_rounding_bytes(layer, 2, threshold_mb=None) == 64
    assert memory.pinned_rounding_bytes(layer, 2, threshold_mb=1) == 64
    assert memory.pinned_rounding_bytes(layer, 2, threshold_mb=0) == 0


def test_bound_pinned_rounding_keeps_the_users_setting(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    parallel.bound_pinned_rounding()
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True,pinned_max_round_threshold_mb:1"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_max_round_threshold_mb:64")
    parallel.bound_pinned_rounding()
    assert os.environ["PYTORCH_ALLOC_CONF"] == "pinned_max_round_threshold_mb:64"
