"""checkpoint.py: the newest complete checkpoint is found whatever state the swap was in, a changed
run-defining flag is refused, metrics.jsonl is truncated to the checkpoint's step, NaN becomes null, and
loading a checkpoint runs no code from it (trainer_state.pt is plain data, a planted pickle is refused)."""

import json
import math
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from scale import checkpoint


def fake_checkpoint(folder, step, complete=True):
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / "trainer_state.pt")
    if complete:
        (folder / "COMPLETE").write_text(f"step {step}\n")


def test_swap_window_resumes_from_the_new_checkpoint(tmp_path):
    """Killed after checkpoint -> checkpoint.old, before checkpoint.tmp -> checkpoint: two complete copies."""
    fake_checkpoint(tmp_path / "checkpoint.old", 10)
    fake_checkpoint(tmp_path / "checkpoint.tmp", 20)
    message = checkpoint.recover(tmp_path)
    assert "checkpoint.tmp" in message and "step 20" in message
    assert checkpoint.complete_step(tmp_path / "checkpoint") == 20
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()


@pytest.mark.parametrize("folders, expected", [
    ({"checkpoint": (10, True)}, 10),
    ({"checkpoint": (10, True), "checkpoint.tmp": (20, False)}, 10),  # killed while writing the new one
    ({"checkpoint": (20, True), "checkpoint.old": (10, True)}, 20),  # killed before removing the old one
    ({"checkpoint.old": (10, True), "checkpoint.tmp": (20, True)}, 20),  # killed between the two renames
    ({"checkpoint.old": (10, True), "checkpoint.tmp": (20, False)}, 10),
])
def test_newest_complete_checkpoint_in_every_state_of_the_swap(tmp_path, folders, expected):
    for name, (step, complete) in folders.items():
        fake_checkpoint(tmp_path / name, step, complete)
    checkpoint.recover(tmp_path)
    assert checkpoint.complete_step(tmp_path / "checkpoint") == expected


def test_no_complete_checkpoint_refuses(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint.tmp", 5, complete=False)
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        checkpoint.recover(tmp_path)


def test_changed_flags_are_refused_or_take_effect():
    saved = {"seed": 0, "group_size": 8, "lr": 3e-5, "max_steps": 10, "resume": False}
    with pytest.raises(SystemExit, match="--group-size was 8 in the checkpoint, now 4"):
        checkpoint.check_run_flags(saved, dict(saved, group_size=4, resume=True))
    with pytest.raises(SystemExit, match="--seed"):
        checkpoint.check_run_flags(saved, dict(saved, seed=1))
    notes = checkpoint.check_run_flags(saved, dict(saved, lr=1e-4, max_steps=20, resume=True))
    assert any(note.startswith("--lr 3e-05 -> 0.0001") for note in notes) and len(notes) == 3


def test_truncate_keeps_rows_up_to_the_checkpoint_and_redoes_its_evaluations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval": "step0"}, {"step": 1}, {"step": 2}, {"step": 2, "eval": "step2"}, {"step": 3},
            {"step": 3, "eval": "final"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert checkpoint.truncate_rows(path, 2) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


def test_nan_is_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    checkpoint.append_row(path, {"step": 1, "hit_rate": math.nan, "kl": math.inf, "nested": [math.nan, 1.0]})
    assert json.loads(path.read_text()) == {"step": 1, "hit_rate": None, "kl": None, "nested": [None, 1.0]}
    assert "NaN" not in path.read_text()


def test_a_changed_process_count_is_refused(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    state = {"step": 3, "sampler_rng": [torch.zeros(8), torch.zeros(8)]}
    torch.save(state, tmp_path / "checkpoint" / "trainer_state.pt")
    checkpoint.check_world_size(checkpoint.trainer_state(tmp_path), 2)
    with pytest.raises(SystemExit, match="written by 2 processes, this run has 1"):
        checkpoint.check_world_size(checkpoint.trainer_state(tmp_path), 1)


# ----------------------------------------------------------------------------------------------
# Loading runs no code


class RunsCode:
    """Unpickled by plain pickle, this calls os.mkdir(path): a stand-in for any code a planted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_trainer_state_is_plain_data_loaded_with_weights_only(tmp_path):
    flags = {"seed": 3, "lr": 1e-4, "model": "tiny", "prompt_suffix": None, "image_sensitivity": True}
    rng = [torch.Generator().manual_seed(seed).get_state() for seed in (0, 1)]
    (tmp_path / "checkpoint").mkdir()
    path = tmp_path / "checkpoint" / "trainer_state.pt"
    torch_rng = torch.get_rng_state()
    checkpoint.write_trainer_state(path, 5, flags, rng)
    assert isinstance(torch.load(path, weights_only=True)["run_flags"], str)  # JSON text
    state = checkpoint.trainer_state(tmp_path)
    assert state["step"] == 5 and state["run_flags"] == flags and torch.equal(state["torch_rng"], torch_rng)
    assert all(torch.equal(a, b) for a, b in zip(state["sampler_rng"], rng))


def test_a_planted_trainer_state_that_would_run_code_is_refused(tmp_path):
    marker, folder = tmp_path / "code-ran", tmp_path / "checkpoint"
    fake_checkpoint(folder, 7)
    torch.save({"step": 7, "run_flags": "{}", "payload": RunsCode(marker)}, folder / "trainer_state.pt")
    with pytest.raises(SystemExit, match=r"trainer_state.pt: refused: .*GLOBAL (posix|nt).mkdir"):
        checkpoint.recover(tmp_path)  # finding the newest complete checkpoint reads its step
    with pytest.raises(SystemExit, match="refused"):
        checkpoint.prepare_out_dir(tmp_path, resume=True, overwrite=False, world_size=1, flags={})
    assert not marker.exists()
    torch.load(folder / "trainer_state.pt", weights_only=False)  # the plant is live: the old load ran its code
    assert marker.is_dir()


def test_a_planted_optimizer_index_is_refused_before_torch_reads_it(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "checkpoint"
    with checkpoint.one_process_is_fine():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / "optimizer",
                 no_dist=True)
    checkpoint.check_optimizer_index(folder)  # a real index passes
    marker = tmp_path / "code-ran"
    (folder / "optimizer" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(SystemExit, match=r"refusing to load global (posix|nt).mkdir"):
        checkpoint.check_optimizer_index(folder)
    assert not marker.exists()
