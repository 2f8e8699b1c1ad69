"""Scale: processes, FSDP2 sharding of the policy and the reference, lean loading, NaN-safe steps.

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
    The vision blocks do not cast their inputs (`cast_forward_inputs=False`): their rotary cos / sin
    stay fp32, as in a bf16 model, so the policy and the reference compute the same thing at step 0.
  * The frozen **reference** is sharded the same way when the policy is (held in the compute dtype,
    no gradients, no optimizer state), and every unit, the root included, is freed after its forward.
  * `--offload` keeps the fp32 masters, their gradients and the AdamW state in host memory (FSDP2's
    `CPUOffloadPolicy`, pinned on GPU); the optimizer step then runs on the CPU.

Lean loading (`load_sharded`): only rank 0 reads the weights. Every rank builds the model on the
meta device, shards it and allocates its own shards; rank 0 then broadcasts one tensor at a time
from its full copy, each rank keeps its slice, and rank 0 drops the tensor. No rank ever holds more
than one full copy in host memory (rank 0: one fp32 copy, shrinking as it is sent; the others: none).

Our code calls the policy's submodules directly (the vision tower once per question, the language
model over the G answers, `lm_head` on the answer positions) instead of the root `forward`, so:
  * `gathered(policy)` - the rollout and evaluation: every unit is all-gathered once and kept
    gathered for the whole sampling loop (not once per token per layer), then resharded.
  * `as_forward(model, fn, ...)` - the teacher-forced pass runs inside one registered FSDP forward
    method, so FSDP sees one forward (one root pre-forward, one root claim, as for a root `forward`)
    instead of every unit claiming the root role in turn, each claim making the all-gather streams wait
    for compute.

NaN-safe steps (`clip_gradients`): the gradient norm is always computed; if it is not finite on any
rank, every rank skips that optimizer step (the weights and the AdamW state stay as they were).

`--fsdp off` (the default with one process) keeps a single-GPU run free of all of this: no process
group is needed and the model is an ordinary module.
"""

import math
import os
import resource
import signal
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, Shard

import model as modeling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PINNED_ROUND_THRESHOLD_MB = 1  # --offload: pinned blocks above this are allocated at their size (bound_pinned_rounding)
DEFAULT_TIMEOUT_MINUTES = 30  # rank 0 writes the whole fp32 checkpoint (33 GB for 7B) while the others wait


# ----------------------------------------------------------------------------------------------
# Processes


def setup_distributed(default_device, timeout_minutes=DEFAULT_TIMEOUT_MINUTES, cpu_collectives=False):
    """(rank, world_size, device): torchrun's environment, NCCL on GPU, gloo on CPU; plain python works too.

    timeout_minutes bounds every collective, including the barrier the other ranks wait in while rank 0
    writes a checkpoint. cpu_collectives (--offload on GPU) adds gloo for CPU tensors next to NCCL: the
    offloaded gradients' norm and the checkpoint's gathers are collectives over CPU tensors.
    """
    if "RANK" not in os.environ:
        return 0, 1, default_device
    if not (math.isfinite(timeout_minutes) and timeout_minutes > 0):
        raise SystemExit(f"--dist-timeout-minutes {timeout_minutes}: must be > 0")
    timeout = timedelta(minutes=timeout_minutes)
    if not torch.cuda.is_available():
        dist.init_process_group("gloo", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)  # first: NCCL's communicator binds to the current device
    dist.init_process_group("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl", timeout=timeout, device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def shutdown():
    """Leave the process group, all ranks together (the barrier: no rank leaves while another still talks)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_worker():
    """End a torchrun worker right after its run, skipping the interpreter's and the C++ runtime's teardown.

    destroy_process_group does not stop gloo's threads: FSDP's device meshes and DTensor's caches (some held
    from C++) keep the process group alive, so its worker and socket threads still run while Python and then
    the C++ runtime tear the process down. A thread caught in that teardown aborts a run that has finished
    ("terminate called without an active exception", SIGABRT; at random, more often on a busy machine).
    By now every collective is done (shutdown's barrier) and every file is closed, so the process ends here,
    with stdout and stderr flushed. Plain python (no torchrun, no process group) exits as usual.
    """
    if "RANK" not in os.environ:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    """Average a dict of floats over ranks (for logging). NaN stays NaN; strings (the same on every rank,
    e.g. `skipped`) pass through."""
    if not dist.is_initialized():
        return values
    keys = sorted(k for k, v in values.items() if not isinstance(v, str))
    t = collective_tensor([float(values[k]) for k in keys], torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {**values, **{k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}}


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


@contextmanager
def stop_on_signal():
    """SIGTERM / SIGINT only record their name; the loop reads it after each step, checkpoints and stops.

    Repeats are recorded too, never obeyed at once: under torchrun a worker may get the scheduler's
    SIGTERM and then the agent's, and must still finish its checkpoint (the agent waits
    --shutdown-timeout seconds, 30 by default, before SIGKILL).
    """
    received = []

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# Sharding and precision


def mixed_precision(dtype, cast_inputs=True):
    """bf16 compute over fp32 shards, fp32 gradient reduction (None for fp32: no cast)."""
    return MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                cast_forward_inputs=cast_inputs)


def bound_pinned_rounding():
    """--offload: FSDP2 pins every parameter's shard (master and gradient) as its own block, and the CUDA caching
    host allocator rounds each block up to a power of two unless told otherwise (pinned_max_round_threshold_mb,
    unbounded by default: c10/core/AllocatorConfig.h, ATen/core/CachingHostAllocator.h), up to 2x the plan.
    Bound it, before the first pinned allocation, unless the user's PYTORCH_ALLOC_CONF already says."""
    conf = os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "pinned_max_round_threshold_mb" not in conf + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        setting = f"pinned_max_round_threshold_mb:{PINNED_ROUND_THRESHOLD_MB}"
        os.environ["PYTORCH_ALLOC_CONF"] = f"{conf},{setting}" if conf else setting


def use_fsdp(fsdp, offload, dtype, world_size):
    """--fsdp auto shards with more than one process, and with bf16 compute under torchrun on one: there FSDP2's
    bf16 copy of the weights computes what the bf16 reference computes, so the KL starts at exactly 0. Without it
    (--fsdp off) autocast keeps the embeddings, the residual stream and RMSNorm in fp32 while the reference runs
    wholly in bf16: the KL at step 0 is a noise floor (CPU: 4.2e-6 on the tiny base model, 0.016 on the tests'
    random one; docs/scale.md)."""
    if offload or fsdp == "on":
        return True
    return fsdp == "auto" and (world_size > 1 or (dtype == "bfloat16" and dist.is_initialized()))


def prepare_offload():
    """--offload, before any CUDA or pinned allocation: bound the pinned rounding, and give the host's AdamW step
    this process's share of the cores (torchrun sets OMP_NUM_THREADS=1 when a node runs several processes)."""
    bound_pinned_rounding()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def offload_policy(offload, device):
    """FSDP2's host-memory offload (pinned for fast copies on GPU; pinning needs CUDA) or none."""
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()


def shard_units(model, mp_policy, vision_policy, offload, reshard_root):
    """fully_shard each text decoder layer and each vision block, then the root (the rest)."""
    for layer in model.model.language_model.layers:
        fully_shard(layer, mp_policy=mp_policy, offload_policy=offload)
    for block in model.model.visual.blocks:
        fully_shard(block, mp_policy=vision_policy, offload_policy=offload)
    fully_shard(model, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard_root)
    model.reshards_root = bool(reshard_root)  # gathered() restores it (None: the root stays gathered)
    register_as_forward(model)
    return model


def shard_policy(policy, dtype, offload=False, device=torch.device("cpu")):
    """Shard the policy: fp32 DTensor shards (this rank's 1/world_size of each), `dtype` compute.

    The vision blocks keep their inputs as given: FSDP would otherwise cast the rotary cos / sin to bf16,
    which a bf16 model (the reference) keeps in fp32. The root stays gathered from forward to backward.
    """
    return shard_units(policy, mixed_precision(dtype), mixed_precision(dtype, cast_inputs=False),
                       offload_policy(offload, device), reshard_root=None)


def shard_reference(reference):
    """Shard the frozen reference like the policy; its parameters are already in the compute dtype, so no
    cast. Every unit, the root included, is freed after its forward: nothing stays gathered between steps."""
    no_cast = MixedPrecisionPolicy(cast_forward_inputs=False)
    return shard_units(reference, no_cast, no_cast, OffloadPolicy(), reshard_root=True)


def shard_teacher(teacher, dtype):
    """Shard the EMA teacher (--ema-teacher) like the policy, so that the update pairs shard with shard: fp32
    shards (model.py: in bf16 the EMA would not move), `dtype` compute, no gradients; every unit, the root
    included, is freed after its forward."""
    teacher.requires_grad_(False)
    return shard_units(teacher, mixed_precision(dtype), mixed_precision(dtype, cast_inputs=False), OffloadPolicy(),
                       reshard_root=True)


def register_as_forward(model):
    """model.run_as_forward(fn, *args) = fn(model, *args), run by FSDP as a forward of the root."""
    model.run_as_forward = types.MethodType(lambda self, fn, *args: fn(self, *args), model)
    register_fsdp_forward_method(model, "run_as_forward")


def as_forward(model, fn, *args):
    """fn(model, *args); for a sharded model inside one registered FSDP forward: one root pre-forward (the
    root's own parameters gathered, FSDP's all-gather streams synchronised with compute once per pass rather
    than at every unit) and one post-backward."""
    return model.run_as_forward(fn, *args) if is_sharded(model) else fn(model, *args)


def is_sharded(model):
    return isinstance(model, FSDPModule)


def fsdp_units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model, dtype):
    """Full parameters for a whole sampling loop or evaluation: gathered once, resharded after.

    Every unit, the root included, stays gathered inside the block: a root that reshards after each forward
    (the reference's, the EMA teacher's) would otherwise be all-gathered again at every decode step, and
    ranks whose answers end early would issue fewer of those collectives than the others (a hang).
    Not sharded: bf16 compute comes from autocast over the fp32 weights (its weight casts are cached
    for the whole block, so a decode loop casts each weight once).
    """
    if not is_sharded(model):
        with compute_precision(model, dtype):
            yield
        return
    units = fsdp_units(model)  # the root first
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model or model.reshards_root, recurse=False)
        for unit in units:
            unit.reshard()


def compute_precision(model, dtype):
    """autocast to bf16 for an unsharded model whose weights are fp32 (FSDP casts by itself)."""
    if dtype == torch.float32 or is_sharded(model):
        return nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Lean loading: rank 0 reads, every rank receives its shards


def load_sharded(policy_from, reference_from, device, dtype, offload=False, prepare=None):
    """(policy, reference or None, tokenizer, image_processor), both sharded, the weights read by rank 0 alone.

    The policy (fp32 masters) comes from `policy_from`, the reference (compute dtype) from `reference_from`
    (None: no reference). `prepare(policy)` runs before sharding (freezing, gradient checkpointing).
    When both come from the same place, rank 0 reads it once and sends each tensor to both.
    """
    policy, state = build_everywhere(policy_from, torch.float32)
    if prepare is not None:
        prepare(policy)
    materialize(shard_policy(policy, dtype, offload, device), device, offload)
    reference = None
    if reference_from is None:
        fill_from_rank0([policy], state, device)
    elif reference_from == policy_from:  # one read, every tensor sent to both
        reference = sharded_reference(modeling.empty_model(policy.config, policy.generation_config, dtype), device)
        fill_from_rank0([policy, reference], state, device)
    else:  # --resume: the policy from the checkpoint, then the reference from the base model
        fill_from_rank0([policy], state, device)
        reference, state = build_everywhere(reference_from, dtype)
        fill_from_rank0([sharded_reference(reference, device)], state, device)
    tokenizer, image_processor = modeling.load_processors(policy_from)
    return policy, reference, tokenizer, image_processor


def load_sharded_teacher(name_or_path, device, dtype, state_file=None):
    """The EMA teacher, sharded (shard_teacher): rank 0 alone reads the start model in fp32 (on --resume with the
    checkpoint's teacher.pt over it, as rules.ema_teacher.load does) and sends each rank its shards."""
    teacher, state = build_everywhere(name_or_path, torch.float32, state_file)
    teacher = materialize(shard_teacher(teacher, dtype), device, offload=False)
    fill_from_rank0([teacher], state, device)
    return teacher


def build_everywhere(name_or_path, dtype, state_file=None):
    """(model on the meta device, rank 0's full state or None elsewhere). Rank 0 reads the configuration and
    the weights (in `dtype`; state_file: a saved state dict loaded over them, as rules.ema_teacher.load does) and
    keeps only the tensors; the other ranks receive the configuration."""
    model, state = None, None
    if is_rank0():
        model = modeling.load_model(name_or_path, torch.device("cpu"), dtype)
        if state_file is not None:  # the EMA teacher's saved weights over the start model's, strictly
            model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        state = {**dict(model.named_buffers()), **model.state_dict()}  # non-persistent buffers too
    configs = broadcast_from_rank0(None if model is None else (model.config, model.generation_config))
    del model
    return modeling.empty_model(*configs, dtype=dtype), state


def sharded_reference(reference, device):
    """A meta-device reference frozen, sharded (shard_reference) and allocated, ready to be filled."""
    reference.requires_grad_(False)
    return materialize(shard_reference(reference), device, offload=False)


def materialize(model, device, offload):
    """Allocate a sharded meta model's shards (host memory with offload) and buffers (on `device`)."""
    model.to_empty(device="cpu" if offload else device)
    if offload:
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    return model


def fill_from_rank0(models, state, device):
    """Every model's shards and buffers from rank 0's full state, one tensor at a time; rank 0 drops each
    tensor once sent (`state` is emptied). Each parameter and buffer of every model must be filled."""
    specs = broadcast_from_rank0(None if state is None else [(k, v.shape, v.dtype) for k, v in state.items()])
    targets = [dict(model.state_dict(keep_vars=True), **dict(model.named_buffers())) for model in models]
    filled = [set() for _ in models]
    for key, shape, dtype in specs:
        full = state.pop(key).to(device) if state is not None else torch.empty(shape, dtype=dtype, device=device)
        if dist.is_initialized():
            dist.broadcast(full, src=0)
        for target, done in zip(targets, filled):
            if key not in target:
                raise KeyError(f"{key}: in the checkpoint, not in the model")
            copy_own_slice(target[key], full)
            done.add(key)
        del full
    for target, done in zip(targets, filled):
        if missing := sorted(set(target) - done):
            raise KeyError(f"not in the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))


def copy_own_slice(tensor, full):
    """Copy this rank's slice of `full` into a sharded parameter (FSDP2: Shard(0), torch.chunk's split), or
    all of it into a plain tensor; casts to the target's dtype (fp32 masters, bf16 reference)."""
    with torch.no_grad():
        if not isinstance(tensor, DTensor):
            tensor.copy_(full)
            return
        if tensor.placements != (Shard(0),):
            raise ValueError(f"expected FSDP2's Shard(0) placement, got {tensor.placements}")
        chunks = full.chunk(tensor.device_mesh.size(), dim=0)
        rank = tensor.device_mesh.get_local_rank()
        local = tensor.to_local()
        local.copy_(chunks[rank] if rank < len(chunks) else full[:0])


# ----------------------------------------------------------------------------------------------
# Stage timings


def clock(device):
    """Wall time after the device's queued work is done, so per-stage timings are honest on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


@contextmanager
def timed(timings, name, device):
    """Add the block's wall time to timings[name], less the time of the blocks timed inside it (a rule's own
    stage, e.g. the EMA teacher's rollout inside the labelling, is billed to itself only)."""
    inner_before, t0 = timings.get("inner", 0.0), clock(device)
    yield
    elapsed = clock(device) - t0
    timings[name] = timings.get(name, 0.0) + elapsed - (timings.get("inner", 0.0) - inner_before)
    timings["inner"] = inner_before + elapsed


def peak_memory(device):
    """On CUDA, this process's peak GPU memory and peak host memory (GiB) so far, for the step's row (the GPU check
    compares them with the plan); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB on Linux


def stage_seconds(timings):
    """{seconds_<stage>: seconds} for the metrics row."""
    return {f"seconds_{name}": seconds for name, seconds in timings.items() if name != "inner"}


# ----------------------------------------------------------------------------------------------
# NaN-safe optimizer steps


def clip_gradients(model, max_norm):
    """(total gradient norm, whether it is finite on every rank); clips to max_norm (0 = off) when finite.

    The norm is computed whatever max_norm is: a NaN or inf gradient (e.g. cuDNN attention's backward on
    Hopper, see model.disable_cudnn_attention) must skip the step on every rank, not be scaled into the
    weights. Same arithmetic as torch.nn.utils.clip_grad_norm_ (get_total_norm, then clip_grads_with_norm_).
    """
    parameters = list(model.parameters())
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    norm = full_norm(total_norm)
    finite = not any_rank(not math.isfinite(norm))
    if finite and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return norm, finite


def full_norm(total_norm):
    """A gradient norm as a float (a DTensor when the gradients are sharded)."""
    return float(total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm)
