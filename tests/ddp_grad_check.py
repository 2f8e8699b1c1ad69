"""Run by tests/test_train.py, once with plain python and once under `torchrun --nproc_per_node 2`.

Both runs take the same global batch of questions and the same sampled answers (drawn with one
seeded generator for the whole batch, identical on every rank); each rank then computes the loss
on its own shard, backpropagates, and averages gradients with train.average_gradients. Rank 0
saves the averaged gradients, which must equal the single-process gradients.
    python tests/ddp_grad_check.py MODEL_DIR DATA_ROOT OUT.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import model as modeling  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

model_dir, data_root, out_path = sys.argv[1:4]
rank, world_size, device = train.setup_distributed()
G = 4
args = train.parse_args(["--model", model_dir, "--group-size", str(G), "--kl-coef", "0.1"])
policy, tokenizer, image_processor = modeling.load(model_dir, "cpu")
reference, _, _ = modeling.load(model_dir, "cpu")
with torch.no_grad():  # make the policy differ from the reference so that the KL term has a gradient
    for p in policy.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
records = data.load_split("slake", data_root, "test")[:4]

prompt_all = rollout.build_inputs(tokenizer, image_processor, records)
generator = torch.Generator().manual_seed(0)
out_all = rollout.sample(policy, tokenizer, prompt_all, G, 6, 1.0, 1.0, generator)

mine = train.shard(list(range(len(records))), rank, world_size)
rows = [q * G + j for q in mine for j in range(G)]
prompt = rollout.build_inputs(tokenizer, image_processor, [records[q] for q in mine])
out = rollout.Rollout(out_all.completion_ids[rows], out_all.completion_mask[rows], [out_all.texts[r] for r in rows])
policy.train()
loss, stats, scores = train.policy_loss(policy, reference, prompt, out, G, args)
loss.backward()
train.average_gradients(policy)
if rank == 0:
    torch.save({name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}, out_path)
