"""Checkpoints: an atomic, resumable record of a Med-Evo run, and the run's metrics log.

A checkpoint is one folder, `<out-dir>/checkpoint`:

    config.json, model.safetensors, ...  a plain `save_pretrained` folder of the fp32 master weights
                                         (+ tokenizer and image processor): `from_pretrained` loads it
    optimizer/                           the AdamW state, one file per rank (torch.distributed.checkpoint:
                                         each rank writes and reads only its own shard under FSDP2)
    trainer_state.pt                     step, the run's defining flags (JSON text), every rank's sampler RNG,
                                         torch RNG: plain data, read back with torch.load(weights_only=True)
    teacher.pt                           --ema-teacher only: the EMA teacher's fp32 weights (rules.ema_teacher.load)
    COMPLETE                             written last: a folder without it is never resumed from

Saving writes `checkpoint.tmp`, then swaps: `checkpoint -> checkpoint.old`, `checkpoint.tmp -> checkpoint`,
remove `checkpoint.old`. A crash at any point leaves at least one complete folder; `recover` finds the
newest complete one (by its step), finishes the interrupted swap, and says which one it took.

Resume is exact or refuses: the flags that define the run are recorded, and a different value on
`--resume` is refused with the flag's name, except the ones in RESUME_MAY_CHANGE, which take effect.

Every rank writes its own optimizer shard into the checkpoint, so every rank must see the same --out-dir
(on several nodes: a shared file system); `check_shared_out_dir` refuses to start otherwise.

Loading a checkpoint runs no code from it. trainer_state.pt holds only tensors and plain values and is read
with torch.load(weights_only=True), which refuses a pickle that names any function or class (a planted file
that would run code is a SystemExit naming it); teacher.pt is read the same way (rules.ema_teacher.load). The
optimizer's index, optimizer/.metadata, is read by torch.distributed.checkpoint with plain pickle.load, so
it is first unpickled here by `check_optimizer_index`, which builds only the few classes such an index holds.

metrics.jsonl has one row per training step and one per evaluation. On resume the rows past the
checkpoint's step (written after the last save, before a kill) are dropped, and so are the evaluations
at and after it, which the resumed run redoes: no row ever appears twice. NaN is written as null.
"""

import json
import math
import pickle
import secrets
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from scale import parallel

# Flags that may differ on --resume; every other flag must equal the checkpoint's.
RESUME_MAY_CHANGE = {
    "resume": "how the run starts",
    "overwrite": "how the run starts",
    "lr": "takes effect from the next step",
    "epochs": "the run's length (the data order of every epoch is fixed by --seed)",
    "max_steps": "the run's length",
    "eval_every": "bookkeeping",
    "eval_batch_size": "bookkeeping",
    "save_every": "bookkeeping",
    "gradient_checkpointing": "recomputes the same activations",
    "offload": "moves the same fp32 states between GPU and host",
    "max_skipped_steps": "bookkeeping",
    "dist_timeout_minutes": "bookkeeping",
}
FOLDERS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")


# ----------------------------------------------------------------------------------------------
# Save


def save(out_dir, policy, tokenizer, image_processor, optimizer, step, run_flags, generator, teacher=None):
    """Write <out_dir>/checkpoint.tmp on every rank (a collective), then swap it in on rank 0 (teacher: the EMA
    teacher, gathered like the policy's weights, written by rank 0 as teacher.pt)."""
    out_dir = Path(out_dir)
    tmp = out_dir / "checkpoint.tmp"
    if parallel.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    # full fp32 weights on rank 0 (gathered from the shards under FSDP2), every rank's optimizer shard
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(policy, options=full)
    teacher_weights = None if teacher is None else get_model_state_dict(teacher, options=full)
    with one_process_is_fine():
        dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=tmp / "optimizer",
                 no_dist=not parallel.dist.is_initialized())
    rng_states = parallel.gather_lists([generator.get_state()])
    if parallel.is_rank0():
        policy.save_pretrained(tmp, state_dict=weights)
        if teacher is not None:
            torch.save(teacher_weights, tmp / "teacher.pt")
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        write_trainer_state(tmp / "trainer_state.pt", step, run_flags, rng_states)
        (tmp / "run_flags.json").write_text(json.dumps(run_flags, indent=1) + "\n")
        (tmp / "COMPLETE").write_text(f"step {step}\n")
        swap_in(out_dir)
    parallel.barrier()


def write_trainer_state(path, step, run_flags, rng_states):
    """Step, run flags, every rank's sampler RNG and the torch RNG, as plain data: the flags are JSON text, so
    the file holds only tensors, numbers and strings, and whatever a flag's value is cannot make it need
    weights_only=False to load (json.dumps refuses a value it cannot write, at the first save)."""
    torch.save({"step": step, "run_flags": json.dumps(run_flags), "sampler_rng": rng_states,
                "torch_rng": torch.get_rng_state()}, path)


@contextmanager
def one_process_is_fine():
    """torch.distributed.checkpoint warns at every call without a process group; one process is a supported run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def swap_in(out_dir):
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def check_shared_out_dir(out_dir):
    """Refuse to start unless every rank sees rank 0's --out-dir: rank 0 writes a token there, all must read it.

    A checkpoint is one folder with one optimizer shard per rank; written to node-local folders, it could not
    be resumed. Collective; one process passes at once.
    """
    if not parallel.dist.is_initialized() or parallel.dist.get_world_size() == 1:
        return
    mark = None
    if parallel.is_rank0():
        mark = (f".rank0-{secrets.token_hex(4)}", secrets.token_hex(8))
        (Path(out_dir) / mark[0]).write_text(mark[1])
    name, token = parallel.broadcast_from_rank0(mark)  # after rank 0's write
    path = Path(out_dir) / name  # this rank's --out-dir
    seen = path.read_text() if path.is_file() else None
    ranks = parallel.gather_lists([(parallel.dist.get_rank(), socket.gethostname(), seen == token)])
    if parallel.is_rank0():
        path.unlink()
    blind = [f"rank {rank} on {host}" for rank, host, ok in ranks if not ok]
    if blind:
        raise SystemExit(f"--out-dir {out_dir}: {', '.join(blind)} cannot read the file rank 0 wrote there ({path}); "
                         f"every rank writes its optimizer shard into the checkpoint, so all nodes must share "
                         f"--out-dir (a shared file system)")


def describe_newest(out_dir):
    """The newest complete checkpoint, in words (for a run that stops on a failure)."""
    folder, step = newest_complete(Path(out_dir))
    if folder is None:
        return "none: no checkpoint was written, the start model is the last good one"
    return f"step {step}, in {folder} (continue from it with --resume)"


# ----------------------------------------------------------------------------------------------
# Find and load


def complete_step(folder):
    """The step of a complete checkpoint folder, or None if it is missing or half-written."""
    if not (folder / "COMPLETE").is_file() or not (folder / "trainer_state.pt").is_file():
        return None
    return read_trainer_state(folder / "trainer_state.pt")["step"]


def newest_complete(out_dir):
    """(folder, step) of the newest complete checkpoint among checkpoint, .tmp and .old; (None, None) if none."""
    found = [(step, -i, out_dir / name) for i, name in enumerate(FOLDERS)
             if (step := complete_step(out_dir / name)) is not None]
    if not found:
        return None, None
    step, _, folder = max(found)
    return folder, step


def recover(out_dir):
    """Rank 0, before resuming: make <out_dir>/checkpoint the newest complete checkpoint. Returns a message."""
    out_dir = Path(out_dir)
    folder, step = newest_complete(out_dir)
    if folder is None:
        raise SystemExit(f"--resume: no complete checkpoint in {out_dir} (looked for {', '.join(FOLDERS)})")
    final = out_dir / "checkpoint"
    if folder != final:  # a crash in the middle of the swap: finish it
        shutil.rmtree(final, ignore_errors=True)
        folder.rename(final)
    for name in FOLDERS[1:]:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    return f"resuming from {folder} (step {step})" + (f", moved to {final}" if folder != final else "")


def check_run_flags(saved, now):
    """Refuse a resume whose run-defining flags differ; return notes for the ones that may change."""
    notes = []
    for name in sorted(set(saved) | set(now)):
        before, after = saved.get(name), now.get(name)
        if before == after:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in RESUME_MAY_CHANGE:
            raise SystemExit(f"--resume: {flag} was {before!r} in the checkpoint, now {after!r}; a resumed run must "
                             f"be the same run (start a new --out-dir to change it)")
        notes.append(f"{flag} {before!r} -> {after!r} ({RESUME_MAY_CHANGE[name]})")
    return notes


def prepare_out_dir(out_dir, resume, overwrite, world_size, flags):
    """Refuse to mix runs in one --out-dir; on --resume recover the checkpoint and check the flags.
    Returns notes for the log."""
    out_dir = Path(out_dir)
    if resume:
        notes = [recover(out_dir)]
        state = trainer_state(out_dir)
        check_world_size(state, world_size)
        notes += check_run_flags(state["run_flags"], json.loads(json.dumps(flags)))  # as saved: JSON values
        step = state["step"]
        dropped = truncate_rows(out_dir / "metrics.jsonl", step)
        return notes + ([f"dropped {dropped} metrics.jsonl row(s) logged after step {step}"] if dropped else [])
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise SystemExit(f"--out-dir {out_dir} is not empty: add --resume to continue that run, --overwrite "
                             f"to delete it and start clean, or choose another --out-dir")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return []


def trainer_state(out_dir):
    """<out_dir>/checkpoint/trainer_state.pt: step, run flags, RNG states."""
    return read_trainer_state(Path(out_dir) / "checkpoint" / "trainer_state.pt")


def read_trainer_state(path):
    """A trainer_state.pt, loaded with weights_only=True: a file that names any function or class (which
    plain pickle would call) is refused with a SystemExit. The run flags come back as a dict (JSON text since
    write_trainer_state; a dict in older checkpoints, which load the same way)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SystemExit(f"{path}: refused: it is not plain data ({refusal(err)}); loading it could run code, "
                         f"and this code never writes such a file: do not resume from this folder") from err
    if not isinstance(state, dict) or "step" not in state:
        raise SystemExit(f"{path}: not a trainer state (a dict with the step, run flags and RNG states)")
    if isinstance(state.get("run_flags"), str):
        state["run_flags"] = json.loads(state["run_flags"])
    return state


def refusal(err):
    """The line of torch.load's weights_only error that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "refused")


# torch.distributed.checkpoint's index (optimizer/.metadata): the classes it may hold, by module (and torch's dtypes)
INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class IndexUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint index, refusing every global outside INDEX_CLASSES."""

    def find_class(self, module, name):
        dtype = module == "torch" and not name.startswith("_") and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in INDEX_CLASSES.get(module, ()):
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def check_optimizer_index(folder):
    """Read <folder>/optimizer/.metadata with IndexUnpickler before torch.distributed.checkpoint reads it with
    plain pickle.load: a planted file that would run code is a SystemExit naming it, and runs nothing."""
    path = Path(folder) / "optimizer" / ".metadata"
    with open(path, "rb") as f:
        try:
            IndexUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise SystemExit(f"{path}: refused: not a plain torch.distributed.checkpoint index ({err}); loading it "
                             f"could run code: do not resume from this folder") from err


def check_world_size(state, world_size):
    """Each rank resumes its own optimizer shard and sampler RNG: the process count must not change."""
    if len(state["sampler_rng"]) != world_size:
        raise SystemExit(f"--resume: the checkpoint was written by {len(state['sampler_rng'])} processes, "
                         f"this run has {world_size}")


def load_trainer_state(out_dir, policy, optimizer, generator, rank, lr):
    """Restore optimizer (this rank's shard), RNGs and step from <out_dir>/checkpoint; set the lr."""
    folder = Path(out_dir) / "checkpoint"
    state = trainer_state(out_dir)
    check_optimizer_index(folder)
    optimizer_state = {"optimizer": get_optimizer_state_dict(policy, optimizer)}
    with one_process_is_fine():
        dcp.load(optimizer_state, checkpoint_id=folder / "optimizer", no_dist=not parallel.dist.is_initialized())
    set_optimizer_state_dict(policy, optimizer, optimizer_state["optimizer"])
    for group in optimizer.param_groups:  # --lr may change on resume (RESUME_MAY_CHANGE)
        group["lr"] = lr
    generator.set_state(state["sampler_rng"][rank])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def json_safe(value):
    """NaN and infinities become None (JSON has no NaN); containers are cleaned recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")


def read_rows(path):
    """metrics.jsonl's rows ([] when there is no file yet)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_rows(path, step):
    """Keep the training rows up to `step` (the checkpoint's) and the evaluations before it: the resumed
    run redoes the evaluation at `step` (if one is due there) and the final one."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows = read_rows(path)
    kept = [r for r in rows if r["step"] < step or (r["step"] == step and "eval" not in r)]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    tmp.replace(path)
    return len(rows) - len(kept)


def first_evaluation(out_dir):
    """The run's evaluation before training (metrics.jsonl's step-0 row), for a resumed run's collapse monitor."""
    path = Path(out_dir) / "metrics.jsonl"
    first = next((r for r in read_rows(path) if r.get("eval") == "step0"), None)
    if first is None:
        raise SystemExit(f"--resume: {path} has no step-0 evaluation row, which the collapse monitor compares with")
    return first
