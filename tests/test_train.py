"""train.py end to end on a tiny random model: unlabeled training, 2-process torchrun, gradient
averaging equal to one process, kill-and-resume, and flag checking."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["--questions-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--lr", "1e-3",
        "--eval-batch-size", "12", "--dataset", "slake"]


def run_args(model_dir, data_root, out_dir, *extra):
    return ["--model", str(model_dir), "--data-root", str(data_root), "--out-dir", str(out_dir), *FAST, *extra]


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_steps(metrics):
    return [m for m in metrics if "eval" not in m]


def torchrun(nproc, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_training_never_needs_answers(tiny_model_dir, unlabeled_slake_folder, tmp_path):
    train.main(run_args(tiny_model_dir, unlabeled_slake_folder, tmp_path, "--max-steps", "2"))
    steps = train_steps(read_metrics(tmp_path))
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0.0 <= m["reward"] <= 1.0 and m["hit_rate"] != m["hit_rate"]  # NaN: nothing to compare with
    assert (tmp_path / "checkpoint" / "config.json").is_file()


def test_two_process_torchrun_two_steps(tiny_model_dir, slake_folder, tmp_path):
    stdout = torchrun(2, "train.py", *run_args(tiny_model_dir, slake_folder, tmp_path, "--max-steps", "2",
                                               "--questions-per-step", "4"))
    assert "step 2/2" in stdout and "eval final" in stdout
    steps = train_steps(read_metrics(tmp_path))
    assert [m["step"] for m in steps] == [1, 2]
    assert len(steps[0]["questions"]) == 4 and not set(steps[0]["questions"]) & set(steps[1]["questions"])


def test_two_process_gradient_equals_one_process(tiny_model_dir, slake_folder, tmp_path):
    script = str(REPO / "tests" / "ddp_grad_check.py")
    subprocess.run([sys.executable, script, str(tiny_model_dir), str(slake_folder), str(tmp_path / "one.pt")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    torchrun(2, script, str(tiny_model_dir), str(slake_folder), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and len(one) > 10
    assert sum(g.abs().sum() for g in one.values()) > 0
    for name in one:  # equal up to float32 summation order (padding and batch shapes differ per rank)
        scale = one[name].abs().max().item()
        assert (two[name] - one[name]).abs().max().item() <= 1e-5 * scale + 1e-8, name


def test_kill_and_resume_continues_exactly(tiny_model_dir, slake_folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(run_args(tiny_model_dir, slake_folder, straight, "--max-steps", "3", "--save-every", "1"))
    train.main(run_args(tiny_model_dir, slake_folder, resumed, "--max-steps", "2", "--save-every", "1"))
    state = torch.load(resumed / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    train.main(run_args(tiny_model_dir, slake_folder, resumed, "--max-steps", "3", "--save-every", "1", "--resume"))
    a, b = train_steps(read_metrics(straight)), train_steps(read_metrics(resumed))
    assert [m["step"] for m in b] == [1, 2, 3]
    assert a[2]["questions"] == b[2]["questions"]  # the same next batch
    for key in ["reward", "kl", "answer_length", "loss"] if "loss" in a[2] else ["reward", "kl", "answer_length"]:
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "--group-size"),
    (["--questions-per-step", "0"], "--questions-per-step"),
    (["--model", "/no/such/model"], "--model"),
    (["--soft-weight", "1.0"], "--soft-weight"),
    (["--dataset", "slake"], "--data-root"),
])
def test_bad_flags_fail_before_any_work(flags, message, tmp_path):
    argv = ["--out-dir", str(tmp_path / "run")] + flags
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_later_updates_take_the_ratio_against_the_sampling_policy(tiny_model_dir, slake_folder):
    """--updates-per-rollout > 1: the second update's ratio is new policy / sampling policy (not 1),
    and the rewards, advantages and old log-probs are the first update's."""
    import data
    import model as modeling
    import rollout

    G = 4
    args = train.parse_args(["--model", str(tiny_model_dir), "--group-size", str(G), "--lr", "1e-2"])
    policy, tokenizer, image_processor = modeling.load(tiny_model_dir, "cpu")
    reference, _, _ = modeling.load(tiny_model_dir, "cpu")
    records = data.load_split("slake", slake_folder, "test")[:2]
    prompt = rollout.build_inputs(tokenizer, image_processor, records)
    out = rollout.sample(policy, tokenizer, prompt, G, 6, 1.0, 1.0, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(policy.parameters(), lr=args.lr)
    loss, first_stats, scores = train.policy_loss(policy, reference, prompt, out, G, args)
    assert first_stats["ratio_mean"] == pytest.approx(1.0) and first_stats["kl"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    optimizer.step()
    _, second_stats, scores_again = train.policy_loss(policy, reference, prompt, out, G, args, rollout_scores=scores)
    assert scores_again is scores
    assert second_stats["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert second_stats["kl"] > 0
