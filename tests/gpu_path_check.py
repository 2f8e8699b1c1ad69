"""Run by tests/test_gpu_path.py under `torchrun --nproc_per_node 2` (gloo): the GPU path's distributed parts on CPU.

    python tests/gpu_path_check.py MODEL_DIR DATA_ROOT SCRATCH OUT.json plain|offload

With bf16 compute over fp32 masters, policy and reference sharded with FSDP2 (--offload: FSDP2's CPUOffloadPolicy):
  1. lean loading: the policy's fp32 shards and the reference's bf16 shards hold the files' weights;
  2. the teacher-forced pass is one FSDP forward: one root claim, every unit run inside it;
  3. step 0: the policy's log-probs equal the reference's exactly (KL 0), and they are fp32;
  4. a NaN in rank 1's gradient shard: both ranks skip the update, the weights stay; the next step updates;
  5. the process-group timeout is the flag's; an --out-dir every rank sees passes, a rank-local one is refused.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale import checkpoint  # noqa: E402
import data  # noqa: E402
from scale import parallel  # noqa: E402
import grpo  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from harness import setup  # noqa: E402

model_dir, data_root, scratch, out_path, mode = sys.argv[1:6]
rank, world_size, device = parallel.setup_distributed(torch.device("cpu"), timeout_minutes=7)
results = {"timeout": str(parallel.dist.group.WORLD._get_backend(device).options._timeout)}
G = 4
offload = ["--offload"] if mode == "offload" else []
args = train.parse_args(["--model", model_dir, "--group-size", str(G), "--lr", "1e-3", "--dtype", "bfloat16",
                         "--max-new-tokens", "6", "--gradient-checkpointing", *offload])


def full_state(model):
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# 1. lean loading: rank 0 reads the files once, both models receive their shards
policy, reference, tokenizer, image_processor = parallel.load_sharded(
    model_dir, model_dir, device, torch.bfloat16, args.offload,
    prepare=lambda model: setup.prepare_modules(model, args))
optimizer = setup.adamw(policy, args)
policy_state, reference_state = full_state(policy), full_state(reference)
if rank == 0:
    files = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    expected = files.state_dict()
    results["policy_equals_files"] = all(torch.equal(policy_state[k], v) for k, v in expected.items())
    results["reference_equals_files"] = all(torch.equal(reference_state[k], v.to(torch.bfloat16))
                                            for k, v in expected.items())
    results["same_keys"] = sorted(policy_state) == sorted(reference_state) == sorted(expected)
    results["buffers_equal"] = all(torch.equal(b, dict(policy.named_buffers())[k]) for k, b in files.named_buffers())
results["masters_fp32"] = all(p.dtype == torch.float32 for p in policy.parameters())
results["shards_on_cpu"] = all(p.to_local().device.type == "cpu" for p in policy.parameters())
results["reference_frozen"] = not any(p.requires_grad for p in reference.parameters())

# 2. one root claim per teacher-forced pass
records = data.load_split("slake", data_root, "test")[:4]
mine = [records[q] for q in train.shard(list(range(4)), rank, world_size)]
prompt = rollout.build_inputs(tokenizer, image_processor, mine)
policy.eval()
with parallel.gathered(policy, torch.bfloat16):
    out = rollout.sample(policy, tokenizer, prompt, G, 6, 1.0, 1.0, torch.Generator().manual_seed(rank))
policy.train()
claims, unit_forwards = [], []
real_root_pre_forward, real_group_pre_forward = FSDPState._root_pre_forward, FSDPParamGroup.pre_forward


def counting_root_pre_forward(self, module, args, kwargs):
    if self._state_ctx.iter_forward_root is None:
        claims.append(type(module).__name__.removeprefix("FSDP"))
    return real_root_pre_forward(self, module, args, kwargs)


def counting_group_pre_forward(self, module, args, kwargs):
    unit_forwards.append(type(module).__name__.removeprefix("FSDP"))
    return real_group_pre_forward(self, module, args, kwargs)


def count_claims(run_pass):
    claims.clear(), unit_forwards.clear()
    FSDPState._root_pre_forward, FSDPParamGroup.pre_forward = counting_root_pre_forward, counting_group_pre_forward
    with torch.no_grad():
        result = run_pass()
    FSDPState._root_pre_forward, FSDPParamGroup.pre_forward = real_root_pre_forward, real_group_pre_forward
    return list(claims), list(unit_forwards), result


results["root_claims"], results["unit_forwards"], (logits, _) = count_claims(
    lambda: rollout.teacher_forced(policy, prompt, out, G, torch.bfloat16))
results["reference_root_claims"], _, _ = count_claims(
    lambda: rollout.teacher_forced(reference, prompt, out, G, torch.bfloat16))
results["fsdp_units"] = len(parallel.fsdp_units(policy))
results["logits_dtype"] = str(logits.dtype)

# 3. step 0: the sharded policy and the sharded reference compute the same log-probs
run = setup.Run(args, policy, reference, tokenizer, image_processor, optimizer, torch.Generator().manual_seed(10 + rank),
                [], rank, world_size, device, torch.bfloat16, Path(scratch))
with torch.no_grad():
    logp = grpo.token_logprobs(rollout.teacher_forced(policy, prompt, out, G, torch.bfloat16)[0], out.completion_ids)
ref_logp = train.reference_logprobs(run, prompt, out)
_, stats = grpo.grpo_loss(logp, logp, ref_logp, torch.zeros(logp.shape[0]), out.completion_mask, kl_coef=args.kl_coef)
results["kl_step0"] = stats["kl"]
results["logp_equal_reference"] = bool(logp.dtype == torch.float32 and torch.equal(logp, ref_logp))
policy.reshard()  # a forward without backward leaves the root gathered

# 4. NaN in rank 1's gradient shard of the first update: every rank skips it
real_clip, injected = parallel.clip_gradients, []


def nan_on_rank1(model, max_norm):
    if rank == 1 and not injected:
        grad = next(p.grad.to_local() for p in model.parameters() if p.grad is not None and p.grad.to_local().numel())
        grad.view(-1)[0] = float("nan")
        injected.append(True)
    return real_clip(model, max_norm)


parallel.clip_gradients = nan_on_rank1


def local_weights():
    return {name: p.to_local().detach().clone() for name, p in policy.named_parameters()}


start = local_weights()
first, _ = train.train_step(run, mine)
after_first, optimizer_state_after_skip = local_weights(), len(optimizer.state)
second, _ = train.train_step(run, mine)
after_second = local_weights()
parallel.clip_gradients = real_clip
results["first_skipped"] = parallel.gather_lists([first.get("skipped")])
results["first_grad_norm_finite"] = parallel.gather_lists([first["grad_norm"] == first["grad_norm"]])
unchanged = all(torch.equal(start[k], v) for k, v in after_first.items())
results["unchanged_after_skip"] = parallel.gather_lists([unchanged])
results["optimizer_state_after_skip"] = optimizer_state_after_skip
results["second_skipped"] = parallel.gather_lists([second.get("skipped")])
results["changed_after_second"] = parallel.gather_lists([sum(not torch.equal(after_first[k], v)
                                                             for k, v in after_second.items())])
final = full_state(policy)
# before this change the pass called the submodules directly, with get_input_embeddings registered as a forward
register_fsdp_forward_method(policy, "get_input_embeddings")
results["root_claims_before"], _, _ = count_claims(lambda: rollout.completion_logits_and_hidden(
    policy, prompt, out.completion_ids, out.completion_mask, G))
policy.reshard()

# 5. --out-dir: seen by every rank, or refused on every rank
shared, local = Path(scratch) / "shared", Path(scratch) / f"only-rank{rank}"
shared.mkdir(exist_ok=True)
local.mkdir(exist_ok=True)
parallel.barrier()
checkpoint.check_shared_out_dir(shared)
results["shared_left_clean"] = not any(shared.iterdir())
try:
    checkpoint.check_shared_out_dir(shared if rank == 0 else local)
    results["refused"] = None
except SystemExit as refusal:
    results["refused"] = str(refusal)
results["refused_on"] = parallel.gather_lists([results["refused"] is not None])

if rank == 0:
    Path(out_path).write_text(json.dumps(results, indent=1))
    torch.save({k: v.float() for k, v in final.items()}, Path(out_path).with_suffix(".pt"))
parallel.shutdown()
parallel.end_worker()
