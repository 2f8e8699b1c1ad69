"""Scale: processes, FSDP2 sharding of the policy, and mixed precision with fp32 master weights.

Med-Evo's GRPO step needs the policy (trained), a frozen reference (for the KL term) and a rollout
on every step. For Qwen2.5-VL-7B that is more than one 80 GB GPU holds if every rank keeps a full
replica with its gradients and AdamW state (~16 bytes per parameter). So, as verl and EasyR1 do:

  * The policy is kept in fp32: the **master weights**, their gradients and the AdamW state are
    fp32, so that an update of lr 1e-6 is not rounded away (in bf16 it mostly is: bf16 resolves
    ~4e-5 around a weight of 0.01).
  * `--dtype bfloat16` computes forward and backward in bf16 over those masters:
      - sharded (FSDP2): `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` - every
        all-gather casts the fp32 shard to bf16, gradients are reduce-scattered in fp32;
      - one process, not sharded: `torch.autocast(bf16)` over the fp32 weights.
  * **FSDP2** (`torch.distributed.fsdp.fully_shard`) shards the policy over ranks: each text decoder
    layer and each vision block is a unit, then the root takes the rest (embeddings, `lm_head`,
    final norm, the vision patch embedding and merger). Gradients are reduced by FSDP, not by hand.

Our code calls the policy's submodules directly (the vision tower once per question, the language
model over the G answers, `lm_head` on the answer positions) instead of the root `forward`, so the
parameters are gathered where they are used:
  * `gathered(policy)` - the rollout and evaluation: every unit is all-gathered once and kept
    gathered for the whole sampling loop (not once per token per layer), then resharded.
  * the teacher-forced pass: its first call, `policy.get_input_embeddings()`, is registered as an
    FSDP forward method, so it gathers the root's own parameters; the decoder layers and vision
    blocks gather themselves in their forward (and again in backward), and FSDP's end-of-backward
    callback reduce-scatters and reshards the root.

`--fsdp off` (the default with one process) keeps a single-GPU run free of all of this: no process
group is needed and the model is an ordinary module.
"""

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# Processes


def setup_distributed(default_device):
    """(rank, world_size, device): torchrun's environment, NCCL on GPU, gloo on CPU; plain python works too."""
    if "RANK" not in os.environ:
        return 0, 1, default_device
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_rank0():
        print(*args, **kwargs)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def collective_tensor(values, dtype):
    """A small tensor for an all-reduce: on this rank's GPU under NCCL, on the CPU under gloo."""
    t = torch.tensor(values, dtype=dtype)
    return t.to("cuda") if dist.get_backend() == "nccl" else t


def mean_over_ranks(values):
    """Average a dict of floats over ranks (for logging). NaN stays NaN."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = collective_tensor([float(values[k]) for k in keys], torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def any_rank(flag):
    """True on every rank if `flag` is true on any rank (e.g. one rank got SIGTERM)."""
    if not dist.is_initialized():
        return bool(flag)
    t = collective_tensor([int(bool(flag))], torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_lists(items):
    """Concatenate every rank's list, in rank order."""
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_from_rank0(obj):
    """rank 0's Python object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# Sharding and precision


def shard_policy(policy, dtype):
    """fully_shard each text decoder layer and each vision block, then the root (the rest).

    The fp32 parameters become DTensor shards (this rank's 1/world_size of each); `dtype` is the
    compute dtype of the gathered parameters.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                     reduce_dtype=torch.float32)
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    for block in policy.model.visual.blocks:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(policy, mp_policy=mp_policy)
    # The teacher-forced pass does not call policy.forward: it starts with policy.get_input_embeddings().
    # Registered as a forward method, that call runs FSDP's root pre-forward: the root's own parameters
    # are gathered (and the root set up on first use), and after backward they are reduce-scattered.
    register_fsdp_forward_method(policy, "get_input_embeddings")
    return policy


def is_sharded(model):
    return isinstance(model, FSDPModule)


def fsdp_units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model, dtype):
    """Full parameters for a whole sampling loop or evaluation: gathered once, resharded after.

    Not sharded: bf16 compute comes from autocast over the fp32 weights (its weight casts are cached
    for the whole block, so a decode loop casts each weight once).
    """
    if not is_sharded(model):
        with compute_precision(model, dtype):
            yield
        return
    blocks = [unit for unit in fsdp_units(model) if unit is not model]  # the root keeps its own setting
    for unit in blocks:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in [model, *blocks]:
        unit.unshard()
    try:
        yield
    finally:
        for unit in blocks:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in [model, *blocks]:
            unit.reshard()


def compute_precision(model, dtype):
    """autocast to bf16 for an unsharded model whose weights are fp32 (FSDP casts by itself)."""
    if dtype == torch.float32 or is_sharded(model):
        return nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


def full_norm(total_norm):
    """clip_grad_norm_'s result as a float (a DTensor when the gradients are sharded)."""
    return float(total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm)
