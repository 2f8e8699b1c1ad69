"""Run by tests/test_train.py, once with plain python and once under `torchrun --nproc_per_node 2`.

Both runs take the same global batch of 4 questions and the same sampled answers (drawn before any
sharding, with one seeded generator, identical on every rank). Each rank computes the GRPO loss on
its own shard; under torchrun the policy is sharded with FSDP2, which reduce-scatters the gradients.
One clipped AdamW update follows. Rank 0 saves the full fp32 parameters after it, which must equal
the single-process ones.
    python tests/fsdp_step_check.py MODEL_DIR DATA_ROOT OUT.pt
"""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import model as modeling  # noqa: E402
from scale import parallel  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from harness import setup  # noqa: E402

model_dir, data_root, out_path = sys.argv[1:4]
rank, world_size, device = parallel.setup_distributed(torch.device("cpu"))
G = 4
args = train.parse_args(["--model", model_dir, "--group-size", str(G), "--kl-coef", "0.1", "--lr", "1e-3"])
policy, tokenizer, image_processor = modeling.load(model_dir, "cpu", dtype=torch.float32)
reference, _, _ = modeling.load(model_dir, "cpu")
with torch.no_grad():  # make the policy differ from the reference so that the KL term has a gradient
    for p in policy.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
records = data.load_split("slake", data_root, "test")[:4]
prompt_all = rollout.build_inputs(tokenizer, image_processor, records)
out_all = rollout.sample(policy, tokenizer, prompt_all, G, 6, 1.0, 1.0, torch.Generator().manual_seed(0))

setup.prepare_modules(policy, args)
if world_size > 1:
    parallel.shard_policy(policy, torch.float32, offload=False, device=device)
run = setup.Run(args, policy, reference, tokenizer, image_processor, setup.adamw(policy, args), torch.Generator(),
                [], rank, world_size, device, torch.float32, Path(out_path).parent)
mine = train.shard(list(range(len(records))), rank, world_size)
rows = [q * G + j for q in mine for j in range(G)]
prompt = rollout.build_inputs(tokenizer, image_processor, [records[q] for q in mine])
out = rollout.Rollout(out_all.completion_ids[rows], out_all.completion_mask[rows], [out_all.texts[r] for r in rows])
policy.train()
train.sample = lambda run, prompt, n: out  # this rank's share of the answers sampled above
stats, _ = train.train_step(run, [records[q] for q in mine])  # one GRPO update: FSDP reduces, AdamW steps
grad_norm = stats["grad_norm"]

# The rollout gathers each FSDP unit once, however many tokens it samples (counting FSDP's all-gathers).
all_gathers = []
real_all_gather = _fsdp_param_group.foreach_all_gather
_fsdp_param_group.foreach_all_gather = lambda *a, **k: all_gathers.append(1) or real_all_gather(*a, **k)
policy.eval()
with parallel.gathered(policy, torch.float32):
    rollout.sample(policy, tokenizer, prompt, G, 6, 1.0, 1.0, torch.Generator().manual_seed(1))
_fsdp_param_group.foreach_all_gather = real_all_gather

weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({"weights": weights, "grad_norm": grad_norm, "rollout_all_gathers": len(all_gathers),
                "fsdp_units": len(parallel.fsdp_units(policy))}, out_path)
parallel.shutdown()
parallel.end_worker()
