"""The shared-prefix teacher-forced pass (each prompt encoded once for its G answers) against the unshared one
(each prompt repeated per answer): outputs and parameter gradients equal to floating-point rounding.

On the tiny random model (init_std 0.5, so activations are large: logits up to ~17, gradients up to ~4e3) with
five questions of different image sizes and prompt lengths, G = 3 answers each, EOS at a different place in each
row and padding after it, this CPU measured (max abs differences, shared vs unshared; gradients: the largest over
parameters of |grad difference| / |grad|, Frobenius norms):
    fp32, eval or train, sdpa:  logits 1.7e-5 (of |logits| <= 17), hidden 4.3e-6, gradients 3.3e-6 (6.4e-3 abs of 3.9e3)
    fp32, eager attention:      logits 1.1e-5, hidden 1.9e-6, gradients 1.1e-6
    activation checkpointing, use_reentrant False and True: bit-identical to the same layout without checkpointing
                                (and so the same distance to the unshared pass); it keeps 2.1 MB for backward, not 8.0
    bf16 autocast (both):       logits 0.13, hidden 0.027, gradients 3.0e-2, while bf16 itself moves the unshared
                                pass from fp32 by logits 2.8, hidden 0.72, gradients 0.70
    FSDP2, 2 processes (gloo):  logits 2.0e-5, hidden 3.6e-6, gradients 3.2e-6; the same with checkpointing,
                                reentrant or not
The tolerances below leave about 5x headroom over those.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import rollout

REPO = Path(__file__).resolve().parents[1]
G, T = 3, 8
LOGITS_ATOL, HIDDEN_ATOL, GRAD_RTOL = 1e-4, 2e-5, 2e-5  # fp32 (grad: of each parameter gradient's norm)


@pytest.fixture(scope="module")
def batch(tiny, image_records):
    """(prompt, completion_ids, completion_mask): sampled answers cut by EOS at varied places, padded after."""
    model, tokenizer, image_processor = tiny
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records)
    out = rollout.sample(model, tokenizer, prompt, G, T, 1.0, 1.0, torch.Generator().manual_seed(0))
    eos = torch.tensor(rollout.eos_token_ids(model, tokenizer))
    ids = out.completion_ids.clone()
    for row, stop in enumerate([0, 2, 5, 7, 3, 1, 6, 4, T, 2, 0, 5, 3, 6, 1]):  # T: no EOS in that row
        if stop < T:
            ids[row, stop] = eos[0]
    mask = rollout.completion_mask_from_ids(ids, eos)
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    assert len(set(mask.sum(1).tolist())) == T and mask.sum(1).max() == T  # lengths 1 .. T
    assert len(set(prompt["attention_mask"].sum(1).tolist())) > 1  # left padding in every row but the longest
    return prompt, ids, mask


def run(model, fn, batch, backward=True):
    """(logits, hidden, {name: grad}, bytes saved for backward) of fn; gradients of a fixed random weighting."""
    prompt, ids, mask = batch
    model.zero_grad(set_to_none=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(backward):
        logits, hidden = fn(model, prompt, ids, mask, G)
    assert logits.dtype == torch.float32 and logits.shape[:2] == hidden.shape[:2] == ids.shape
    grads = {}
    if backward:
        generator = torch.Generator().manual_seed(1)
        weights = torch.randn(logits.shape, generator=generator), torch.randn(hidden.shape, generator=generator)
        ((logits * weights[0]).sum() + (hidden.float() * weights[1]).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    return logits.detach(), hidden.detach(), grads, sum(saved.values())


def differences(a, b):
    """Largest abs difference of logits and hidden, largest per-tensor relative (norm) difference of gradients."""
    assert a[2].keys() == b[2].keys()
    grad = max([((a[2][n] - b[2][n]).norm() / a[2][n].norm()).item() for n in a[2]], default=0.0)
    return (a[0] - b[0]).abs().max().item(), (a[1].float() - b[1].float()).abs().max().item(), grad


def assert_fp32_equal(a, b):
    logits, hidden, grad = differences(a, b)
    assert logits <= LOGITS_ATOL and hidden <= HIDDEN_ATOL and grad <= GRAD_RTOL, (logits, hidden, grad)


# ----------------------------------------------------------------------------------------------
# The layout


def test_mask_lets_each_answer_see_the_prompt_and_its_own_past_only():
    prompt_mask = torch.tensor([[0, 1, 1]])  # L = 3, left padding
    answer_mask = torch.tensor([[1, 0, 1, 1]])  # G = 2 answers of T = 2: the first stops after one token
    mask = rollout.shared_prefix_mask(prompt_mask, answer_mask, 2)[0, 0].int()
    assert mask.tolist() == [
        [0, 0, 0, 0, 0, 0, 0],  # the padding sees nothing (as in the unshared causal padding mask)
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],  # answer 1, token 0
        [0, 1, 1, 1, 0, 0, 0],  # answer 1, padding after EOS: the real tokens before it
        [0, 1, 1, 0, 0, 1, 0],  # answer 2 never sees answer 1
        [0, 1, 1, 0, 0, 1, 1],
    ]


def test_shared_path_is_the_default_for_sdpa(tiny, batch):
    model = tiny[0].eval()
    assert rollout.shared_prefix_refusal(model) is None
    default = run(model, rollout.completion_logits_and_hidden, batch, backward=False)
    shared = run(model, rollout.completion_logits_and_hidden_shared, batch, backward=False)
    assert torch.equal(default[0], shared[0]) and torch.equal(default[1], shared[1])


def test_one_answer_per_question_runs_the_unshared_pass(tiny, batch):
    """G = 1 (the warm start, evaluation's greedy answers): nothing to share, the same tokens either way."""
    model = tiny[0].eval()
    prompt, ids, mask = batch
    rows = list(range(0, ids.shape[0], G))  # the first answer of each question
    with torch.no_grad():
        default = rollout.completion_logits_and_hidden(model, prompt, ids[rows], mask[rows], 1)
        unshared = rollout.completion_logits_and_hidden_unshared(model, prompt, ids[rows], mask[rows], 1)
        shared = rollout.completion_logits_and_hidden_shared(model, prompt, ids[rows], mask[rows], 1)
    assert torch.equal(default[0], unshared[0]) and torch.equal(default[1], unshared[1])
    assert (shared[0] - unshared[0]).abs().max() <= LOGITS_ATOL and (shared[1] - unshared[1]).abs().max() <= HIDDEN_ATOL


# ----------------------------------------------------------------------------------------------
# Equal to the unshared pass


@pytest.mark.parametrize("mode", ["eval", "train", "eager"])
def test_outputs_and_gradients_equal_the_unshared_pass(tiny, batch, mode):
    model = tiny[0]
    if mode == "eager":  # eager attention adds a float mask to the scores
        model = copy.deepcopy(model)
        model.config._attn_implementation = "eager"
        assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "eager"
    model.train(mode == "train")
    unshared = run(model, rollout.completion_logits_and_hidden_unshared, batch)
    shared = run(model, rollout.completion_logits_and_hidden_shared, batch)
    assert_fp32_equal(unshared, shared)
    assert len(shared[2]) == sum(1 for p in model.parameters() if p.requires_grad)
    assert shared[3] < unshared[3]  # fewer bytes kept for backward: the prompt's activations once, not G times


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_is_exact(tiny, batch, reentrant):
    """transformers' activation checkpointing recomputes the packed row bit for bit, reentrant or not."""
    model = tiny[0].train()
    plain = run(model, rollout.completion_logits_and_hidden_shared, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        checkpointed = run(model, rollout.completion_logits_and_hidden_shared, batch)
        unshared = run(model, rollout.completion_logits_and_hidden_unshared, batch)
    finally:
        model.activation_checkpointing_disable()
    assert checkpointed[3] < plain[3] / 2  # checkpointing is on: far fewer bytes kept for backward
    assert torch.equal(checkpointed[0], plain[0]) and torch.equal(checkpointed[1], plain[1])
    assert all(torch.equal(checkpointed[2][n], plain[2][n]) for n in plain[2])
    assert_fp32_equal(unshared, checkpointed)


def test_bf16_autocast_differs_by_less_than_bf16_itself(tiny, batch):
    model = tiny[0].train()
    fp32 = run(model, rollout.completion_logits_and_hidden_unshared, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unshared = run(model, rollout.completion_logits_and_hidden_unshared, batch)
        shared = run(model, rollout.completion_logits_and_hidden_shared, batch)
    assert shared[0].dtype == torch.float32 and shared[1].dtype == unshared[1].dtype
    layout, rounding = differences(unshared, shared), differences(fp32, unshared)
    assert layout[0] <= 0.6 and layout[1] <= 0.15 and layout[2] <= 0.12, layout  # measured 0.13, 0.027, 0.023
    assert all(a <= b / 4 for a, b in zip(layout, rounding)), (layout, rounding)  # bf16 alone: 2.8, 0.72, 0.68


# ----------------------------------------------------------------------------------------------
# Attention that takes no 4-D mask: the unshared pass, said once


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_flash_and_flex_attention_refuse_the_shared_layout(tiny, implementation):
    model = copy.deepcopy(tiny[0])
    model.config._attn_implementation = implementation  # only read here, never run
    assert implementation in rollout.shared_prefix_refusal(model)


def test_fallback_runs_the_unshared_pass_and_says_so_once(tiny, batch, capsys, monkeypatch):
    """An attention implementation outside sdpa / eager (here sdpa registered under another name, so that it
    runs on a CPU) gets the unshared pass, bit for bit, and one notice however often it is called."""
    name = "sdpa_under_another_name"
    AttentionInterface.register(name, sdpa_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    monkeypatch.setattr(rollout, "_notices_printed", set())
    try:
        model = copy.deepcopy(tiny[0]).eval()
        model.config._attn_implementation = name
        capsys.readouterr()
        first = run(model, rollout.completion_logits_and_hidden, batch)
        second = run(model, rollout.completion_logits_and_hidden, batch, backward=False)
        printed = capsys.readouterr().out
        unshared = run(model, rollout.completion_logits_and_hidden_unshared, batch)
    finally:
        AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)
    assert printed.count("\n") == 1 and name in printed and "no prefix sharing" in printed, printed
    for out in (first, second):
        assert torch.equal(out[0], unshared[0]) and torch.equal(out[1], unshared[1])
    assert all(torch.equal(first[2][n], unshared[2][n]) for n in unshared[2])


# ----------------------------------------------------------------------------------------------
# FSDP2, 2 processes


def test_two_process_fsdp_shared_equals_unshared(tiny_model_dir, image_records, tmp_path):
    out = tmp_path / "prefix_fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "prefix_fsdp_check.py"), str(tiny_model_dir), str(out),
           *[r["image"] for r in image_records]]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["fsdp_units"] == 2 + 2 + 1
    results = report["results"]
    layout, rounding = results.pop("sharded_bf16").values()  # the sharded bf16 path: the layout's difference is
    assert all(a <= b / 4 for a, b in zip(layout, rounding)), (layout, rounding)  # well inside bf16's own rounding
    for setting, r in results.items():
        assert r["logits"] <= LOGITS_ATOL and r["hidden"] <= HIDDEN_ATOL and r["grad_relative"] <= GRAD_RTOL, setting
        assert r["grad_names"] > 0 and r["default_is_shared"] == 0.0, setting
    for setting in ("checkpointing", "checkpointing_reentrant"):
        assert results[setting]["saved_bytes_shared"] < results["plain"]["saved_bytes_shared"] / 2  # it is on


# ----------------------------------------------------------------------------------------------
# The memory plan counts the layout the pass runs


def test_start_up_plan_counts_the_layout_the_pass_runs():
    from types import SimpleNamespace

    from scale import memory

    model = memory.meta_model("3B", layers=2)
    args = SimpleNamespace(questions_per_step=8, group_size=8, label_samples=8, max_new_tokens=16, eval_batch_size=32,
                           gradient_checkpointing=True, dtype="bfloat16", offload=False, ema_teacher=False)
    dims = memory.model_dims(model.config)

    def teacher_forced_gib(shared):
        plan = memory.activation_plan(dims, 388, 324, 8, 8, 8, 16, 32, True, shared_prefix=shared)
        return f"teacher-forced {plan['teacher_forced'] / 2**30:.2f} GiB"

    assert teacher_forced_gib(True) in memory.run_plan(model, args, 1, False, True, 388, 324)  # sdpa: shared
    model.config._attn_implementation = "flash_attention_2"  # only read here
    assert teacher_forced_gib(False) in memory.run_plan(model, args, 1, False, True, 388, 324)
    assert teacher_forced_gib(True) != teacher_forced_gib(False)
