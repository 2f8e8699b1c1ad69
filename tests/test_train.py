"""train.py end to end on a tiny random model: unlabeled training, FSDP2 under a 2-process torchrun
equal to one process, bf16 compute over fp32 master weights, the GPU defaults together on CPU,
preemption and exact resume, and flag checking."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import data
import model as modeling
import grpo
import train
from harness import setup

REPO = Path(__file__).resolve().parents[1]
FAST = ["--questions-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--lr", "1e-3",
        "--eval-batch-size", "12", "--dataset", "slake"]
GPU_DEFAULTS = ["--dtype", "bfloat16", "--gradient-checkpointing", "--eval-every", "1", "--updates-per-rollout", "2"]


def run_args(model_dir, data_root, out_dir, *extra):
    return ["--model", str(model_dir), "--data-root", str(data_root), "--out-dir", str(out_dir), *FAST, *extra]


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_steps(metrics):
    return [m for m in metrics if "eval" not in m]


def torchrun_cmd(nproc, *argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]


def torchrun(nproc, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(torchrun_cmd(nproc, *argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def assert_same_steps(a, b, steps, keys=("reward", "kl", "answer_length", "clip_frac", "ratio_mean")):
    for step in steps:
        for key in keys:
            assert a[step - 1][key] == pytest.approx(b[step - 1][key], rel=1e-4, abs=1e-6), (step, key)
        assert a[step - 1]["questions"] == b[step - 1]["questions"]


# ----------------------------------------------------------------------------------------------
# Training without labels, one process


def test_training_never_needs_answers(tiny_model_dir, unlabeled_slake_folder, tmp_path):
    train.main(run_args(tiny_model_dir, unlabeled_slake_folder, tmp_path, "--max-steps", "2"))
    steps = train_steps(read_metrics(tmp_path))
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0.0 <= m["reward"] <= 1.0 and m["hit_rate"] is None  # nothing to compare with: null, not NaN
    assert (tmp_path / "checkpoint" / "config.json").is_file()


def test_later_updates_take_the_ratio_against_the_sampling_policy(tiny_model_dir, slake_folder, monkeypatch):
    """--updates-per-rollout 2: the second update's ratio is new policy / sampling policy (not 1), and the
    advantages, old and reference log-probs are the first update's (computed once per rollout)."""
    G = 4
    args = train.parse_args(["--model", str(tiny_model_dir), "--group-size", str(G), "--lr", "1e-2",
                             "--updates-per-rollout", "2", "--questions-per-step", "2"])
    policy, tokenizer, image_processor = modeling.load(tiny_model_dir, "cpu")
    reference, _, _ = modeling.load(tiny_model_dir, "cpu")
    records = [dict(r, answer=None) for r in data.load_split("slake", slake_folder, "test")[:2]]
    run = setup.make_run(args, policy, tokenizer, image_processor, reference=reference)
    calls, real_loss = [], grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **k: calls.append((a, real_loss(*a, **k))) or calls[-1][1])
    stats, _ = train.train_step(run, records)
    (first_args, (_, first)), (second_args, (_, second)) = calls
    assert first["ratio_mean"] == pytest.approx(1.0) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ratio_mean"] == first["ratio_mean"]  # the step logs the fresh rollout's view
    for i in (1, 2, 3):  # old_logp, ref_logp, advantages: the very same tensors
        assert second_args[i] is first_args[i]
    assert second["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert second["kl"] > 0


# ----------------------------------------------------------------------------------------------
# Precision: fp32 master weights under bf16 compute


def test_bf16_compute_moves_weights_as_much_as_fp32_at_lr_1e6(tiny_model_dir, slake_folder, tmp_path):
    """Two updates at lr 1e-6. Pure-bf16 AdamW would round these steps away (the tiny model's weights are
    ~0.5, where bf16 resolves ~2e-3); with fp32 masters bf16 moves the weights as fp32 does. The bf16 run
    also has gradient checkpointing and --eval-every 1 on: the GPU defaults, on CPU."""
    start = weights(tiny_model_dir)
    moved = {}
    for dtype in ["float32", "bfloat16"]:
        extra = ["--gradient-checkpointing", "--eval-every", "1"] if dtype == "bfloat16" else []
        train.main(run_args(tiny_model_dir, slake_folder, tmp_path / dtype, "--max-steps", "2", "--lr", "1e-6",
                            "--dtype", dtype, *extra))
        after = weights(tmp_path / dtype / "checkpoint")
        assert all(after[k].dtype == torch.float32 for k in after)  # the checkpoint keeps the fp32 masters
        moved[dtype] = torch.cat([(after[k] - start[k]).abs().flatten() for k in start]).mean().item()
    assert moved["float32"] > 1e-7
    assert 0.5 < moved["bfloat16"] / moved["float32"] < 2.0, moved
    evals = [m["eval"] for m in read_metrics(tmp_path / "bfloat16") if "eval" in m]
    assert evals == ["step0", "step1", "final"]


# ----------------------------------------------------------------------------------------------
# FSDP2 under torchrun


def test_two_process_fsdp_update_equals_one_process(tiny_model_dir, slake_folder, tmp_path):
    """One clipped AdamW update on the same global batch and the same sampled answers: FSDP2 over 2
    processes (each computing its own half of the batch) gives the single process's fp32 parameters."""
    script = str(REPO / "tests" / "fsdp_step_check.py")
    subprocess.run([sys.executable, script, str(tiny_model_dir), str(slake_folder), str(tmp_path / "one.pt")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    torchrun(2, script, str(tiny_model_dir), str(slake_folder), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    start = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert one["weights"].keys() == two["weights"].keys() == start.keys()
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for name, w in one["weights"].items():
        assert two["weights"][name].shape == w.shape == start[name].shape  # full, gathered from the shards
        # equal up to float32 summation order: within 5% of one update step (lr 1e-3) of each other
        assert (two["weights"][name] - w).abs().max().item() <= 5e-5, name
    assert all((w - start[name]).abs().max() > 0 for name, w in one["weights"].items())  # every weight was updated
    assert two["fsdp_units"] == 2 + 2 + 1  # 2 decoder layers, 2 vision blocks, the root
    assert two["rollout_all_gathers"] == two["fsdp_units"]  # one gather per unit for a 6-token rollout


def test_two_process_preempted_run_resumes_exactly(tiny_model_dir, slake_folder, tmp_path):
    """A real SIGTERM to a 2-process torchrun job running the GPU defaults (bf16, gradient checkpointing,
    --eval-every, 2 updates per rollout): every rank finishes its step, checkpoints and exits 0; --resume
    then continues exactly like an uninterrupted run, and the checkpoint loads in plain transformers."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--max-steps", "4", "--epochs", "2", "--questions-per-step", "4", *GPU_DEFAULTS]
    torchrun(2, "train.py", *run_args(tiny_model_dir, slake_folder, straight, *flags))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = subprocess.Popen(torchrun_cmd(2, "train.py", *run_args(tiny_model_dir, slake_folder, stopped, *flags,
                                                                 "--save-every", "100")),
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in job.stdout:  # wait until step 1 is done, then preempt
        lines.append(line)
        if line.startswith("step 1/4"):
            job.send_signal(signal.SIGTERM)
            break
    lines += job.stdout.readlines()
    job.wait(timeout=120)
    output = "".join(lines)
    assert "stopped by SIGTERM after step" in output, output[-3000:]
    saved_step = int(output.split("stopped by SIGTERM after step ")[1].split("/")[0])
    assert saved_step in (1, 2, 3)  # the step in progress when the signal came (2, unless the machine stalls)
    assert "[rank0]" not in output and "[rank1]" not in output, output[-3000:]  # no rank failed (torchrun itself
    # reports the SIGTERM it got with its own traceback and exit code 1, after the ranks have finished)
    model = AutoModelForImageTextToText.from_pretrained(stopped / "checkpoint")  # plain transformers, full shapes
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert ({k: v.shape for k, v in model.state_dict().items()}
            == {k: v.shape for k, v in original.state_dict().items()})

    torchrun(2, "train.py", *run_args(tiny_model_dir, slake_folder, stopped, *flags, "--resume"))
    a, b = train_steps(read_metrics(straight)), train_steps(read_metrics(stopped))
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # no step logged twice
    assert_same_steps(a, b, range(saved_step + 1, 5))
    assert [m["eval"] for m in read_metrics(stopped) if "eval" in m] == ["step0", "step1", "step2", "step3", "final"]


# ----------------------------------------------------------------------------------------------
# Resume, one process


def test_kill_and_resume_continues_exactly(tiny_model_dir, slake_folder, tmp_path):
    """One process with the GPU defaults (bf16, gradient checkpointing, --eval-every 1, 2 updates per rollout)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(run_args(tiny_model_dir, slake_folder, straight, "--max-steps", "3", *GPU_DEFAULTS))
    train.main(run_args(tiny_model_dir, slake_folder, resumed, "--max-steps", "2", *GPU_DEFAULTS))
    state = torch.load(resumed / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    train.main(run_args(tiny_model_dir, slake_folder, resumed, "--max-steps", "3", "--resume", *GPU_DEFAULTS))
    a, b = train_steps(read_metrics(straight)), train_steps(read_metrics(resumed))
    assert [m["step"] for m in b] == [1, 2, 3]
    assert_same_steps(a, b, [3])


# ----------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "--group-size"),
    (["--questions-per-step", "0"], "--questions-per-step"),
    (["--model", "/no/such/model"], "--model"),
    (["--soft-weight", "1.0"], "--soft-weight"),
    (["--dataset", "slake"], "datasets/slake"),
    (["--fsdp", "on"], "--fsdp on"),
])
def test_bad_flags_fail_before_any_work(flags, message, tmp_path):
    argv = ["--out-dir", str(tmp_path / "run")] + flags
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_slake_without_data_root_offline_says_where_to_put_it(tmp_path):
    """No local copy, no network (HF_HUB_OFFLINE, conftest.py): one line naming the Hub repository and the
    manual route, before any work."""
    with pytest.raises(SystemExit) as err:
        train.main(["--dataset", "slake", "--out-dir", str(tmp_path / "run")])
    message = str(err.value)
    assert "BoKelvin/SLAKE" in message and "\n" not in message
    assert str(REPO / "datasets" / "slake") in message and "imgs/xmlabN/source.jpg" in message
    assert "--data-root" in message and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [
    ("--save-every", "0"), ("--updates-per-rollout", "0"), ("--max-new-tokens", "0"), ("--eval-batch-size", "0"),
    ("--kl-coef", "-1"), ("--epochs", "0"), ("--max-steps", "-1"), ("--eval-every", "-1"), ("--lr", "nan"),
    ("--lr", "inf"),
    ("--clip-eps", "0"), ("--temperature", "0"), ("--top-p", "1.5"), ("--grad-clip", "-1"), ("--seed", "-1"),
])
def test_every_flag_is_range_checked_before_any_work(flag, value, tmp_path):
    with pytest.raises(SystemExit) as err:
        train.main(["--out-dir", str(tmp_path / "run"), flag, value])
    message = str(err.value)
    assert message.startswith(f"{flag} ") and ": must be" in message, message
    assert not (tmp_path / "run").exists()


def test_missing_synthetic_data_root_is_an_error_not_a_new_benchmark(tmp_path):
    with pytest.raises(SystemExit, match="--data-root .*typo: no such folder"):
        train.main(["--out-dir", str(tmp_path / "run"), "--data-root", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists() and not (tmp_path / "run").exists()


def test_corrupt_image_is_found_before_any_model_loads(slake_folder, tmp_path):
    broken = tmp_path / "slake"
    shutil.copytree(slake_folder, broken)
    (broken / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as err:  # --model tiny: the offline model is never built or loaded
        train.main(["--data-root", str(broken), "--dataset", "slake", "--out-dir", str(tmp_path / "run")])
    assert "xmlab1/source.jpg" in str(err.value) and "cannot read image" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_out_dir_resume_and_overwrite(tiny_model_dir, slake_folder, tmp_path, capsys):
    """A non-empty --out-dir refuses a fresh run; a changed run-defining flag refuses --resume; --lr and
    --max-steps may change on resume and take effect; resuming a finished run adds no second row."""
    out = tmp_path / "run"
    train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1"))
    with pytest.raises(SystemExit, match="is not empty: add --resume"):
        train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1"))
    with pytest.raises(SystemExit, match="--group-size was 4 in the checkpoint, now 2"):
        train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1", "--resume", "--group-size", "2"))
    train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1", "--resume"))  # finished already
    rows = read_metrics(out)
    assert [m.get("eval") for m in rows] == ["step0", None, "final"]

    step1 = weights(out / "checkpoint")
    capsys.readouterr()
    train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "2", "--resume", "--lr", "1e-2"))
    assert "--lr 0.001 -> 0.01 (takes effect from the next step)" in capsys.readouterr().out
    step2 = weights(out / "checkpoint")
    moved = torch.cat([(step2[k] - step1[k]).abs().flatten() for k in step1]).mean().item()
    assert moved > 2e-3  # an AdamW step moves weights by about lr: 1e-2 took effect, not the saved 1e-3
    assert [m["step"] for m in train_steps(read_metrics(out))] == [1, 2]

    train.main(run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1", "--overwrite"))
    assert [m["step"] for m in train_steps(read_metrics(out))] == [1]


def test_one_bf16_process_under_torchrun_shards_so_the_kl_starts_at_zero(tiny_model_dir, slake_folder, tmp_path):
    """--dtype bfloat16 under torchrun with one process: --fsdp auto shards (FSDP2 computes with a bf16 copy of the
    weights, as the bf16 reference does), so the first step's KL is exactly 0; --fsdp off runs autocast over the
    fp32 weights, whose fp32 residual stream leaves a small noise floor (docs/scale.md)."""
    kl = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        torchrun(1, "train.py", *run_args(tiny_model_dir, slake_folder, out, "--max-steps", "1", "--dtype", "bfloat16",
                                          "--fsdp", mode, "--no-image-sensitivity"))
        kl[mode] = train_steps(read_metrics(out))[0]["kl"]
    assert kl["auto"] == 0.0
    assert kl["off"] > 0.0, kl  # 0.016 on this random model (large activations), 4.2e-6 on the tiny base
