"""Run by tests/test_prefix_sharing.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU).

The tiny model is sharded with FSDP2 as train.py shards the policy (scale.parallel.shard_policy, fp32), each rank
takes its own questions, and the teacher-forced pass runs as one registered FSDP forward (parallel.as_forward),
once with the shared-prefix layout and once with the prompt repeated per answer; a fixed random weighting of the
logits and hidden states is back-propagated each time. Three settings: no checkpointing, then transformers'
activation checkpointing with use_reentrant False and True; then the sharded bf16 path (bf16 compute over fp32
masters), shared vs unshared beside bf16's own rounding. Rank 0 writes, per setting, the largest difference
of the logits and of the hidden states (over both ranks) and of every full (gathered) parameter gradient.
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/prefix_fsdp_check.py MODEL_DIR OUT.json IMG...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model as modeling  # noqa: E402
import rollout  # noqa: E402
from scale import parallel  # noqa: E402

model_dir, out_path, images = sys.argv[1], sys.argv[2], sys.argv[3:]
rank, world_size, device = parallel.setup_distributed(torch.device("cpu"))
G, T = 3, 7
questions = ["What modality is used to take this image?", "Is there a lesion?", "How many kidneys?",
             "Where is the lesion in the left lung of this patient?"]
records = [{"image": image, "question": questions[i % len(questions)]} for i, image in enumerate(images)]
records = records[rank::world_size]  # each rank its own questions (different image sizes and prompt lengths)

policy, tokenizer, image_processor = modeling.load(model_dir, "cpu", dtype=torch.float32)
prompt = rollout.build_inputs(tokenizer, image_processor, records)
B = len(records)
# answers: sampled, then cut by an EOS at a different place in each row, padding after it (before sharding)
out = rollout.sample(policy, tokenizer, prompt, G, T, 1.0, 1.0, torch.Generator().manual_seed(rank))
eos = torch.tensor(rollout.eos_token_ids(policy, tokenizer))
ids = out.completion_ids.clone()
for row in range(B * G):
    stop = (3 * row + rank) % (T + 2)
    if stop < T:
        ids[row, stop] = eos[0]
mask = rollout.completion_mask_from_ids(ids, eos)
ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)

policy.train()
parallel.shard_policy(policy, torch.float32)
weights = None


def run(fn):
    """(logits, hidden, {name: full gradient}) of one forward + backward of fn as an FSDP forward."""
    global weights
    policy.zero_grad(set_to_none=True)
    saved = {}  # storages autograd keeps for backward: fewer with checkpointing (so it is on)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, hidden = parallel.as_forward(policy, fn, prompt, ids, mask, G)
    if weights is None:
        generator = torch.Generator().manual_seed(100 + rank)
        weights = (torch.randn(logits.shape, generator=generator), torch.randn(hidden.shape, generator=generator))
    ((logits * weights[0]).sum() + (hidden * weights[1]).sum()).backward()
    grads = {name: p.grad.full_tensor() for name, p in policy.named_parameters() if p.grad is not None}
    return logits.detach(), hidden.detach(), grads, sum(saved.values())


def largest(value):
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


results = {}
for setting, reentrant in [("plain", None), ("checkpointing", False), ("checkpointing_reentrant", True)]:
    if reentrant is not None:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    unshared = run(rollout.completion_logits_and_hidden_unshared)
    fp32 = unshared if setting == "plain" else fp32
    shared = run(rollout.completion_logits_and_hidden_shared)
    default = run(rollout.completion_logits_and_hidden)  # what train.py calls: the shared layout (sdpa)
    results[setting] = {
        "logits": largest((shared[0] - unshared[0]).abs().max()),
        "hidden": largest((shared[1] - unshared[1]).abs().max()),
        "logits_scale": largest(unshared[0].abs().max()),
        "grad_names": sorted(shared[2]) == sorted(unshared[2]) and len(shared[2]),
        "grad": max((shared[2][n] - unshared[2][n]).abs().max().item() for n in unshared[2]),
        "grad_relative": max(((shared[2][n] - unshared[2][n]).norm() / unshared[2][n].norm()).item()
                             for n in unshared[2]),
        "saved_bytes_shared": shared[3],
        "default_is_shared": largest(max((default[i] - shared[i]).abs().max() for i in (0, 1))),
    }
    if reentrant is not None:
        policy.activation_checkpointing_disable()
# the sharded bf16 path: FSDP2's bf16 compute over fp32 masters (shard_policy(.., bfloat16)), shared vs unshared, and
# for scale bf16's own rounding (unshared bf16 vs unshared fp32)
units = len(parallel.fsdp_units(policy))
policy, _, _ = modeling.load(model_dir, "cpu", dtype=torch.float32)
policy.train()
parallel.shard_policy(policy, torch.bfloat16)
unshared, shared = run(rollout.completion_logits_and_hidden_unshared), run(rollout.completion_logits_and_hidden_shared)


def grad_relative(a, b):
    return max(((a[2][n].float() - b[2][n].float()).norm() / b[2][n].float().norm()).item() for n in b[2])


results["sharded_bf16"] = {
    "layout": [largest((shared[0] - unshared[0]).abs().max()), largest((shared[1].float() - unshared[1].float()).abs()
                                                                       .max()), largest(grad_relative(shared, unshared))],
    "rounding": [largest((unshared[0] - fp32[0]).abs().max()), largest((unshared[1].float() - fp32[1]).abs().max()),
                 largest(grad_relative(unshared, fp32))],
}
if rank == 0:
    Path(out_path).write_text(json.dumps({"world_size": world_size, "fsdp_units": units,
                                          "results": results}, indent=1))
parallel.shutdown()
parallel.end_worker()
