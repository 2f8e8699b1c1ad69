"""Label-free adaptation: --label-samples chooses the pseudo label from N samples and trains on G of them;
the consensus and answer statistics match hand-worked values; --stop-on-collapse fires on a collapsing
run (keeping the last healthy checkpoint) and not on a healthy one."""

import itertools
import json
import math

import pytest
import torch

import centroid
import data
import evaluate
import model as modeling
import monitor
import rollout
import train
from harness import setup
from rules import label_samples


def step_on(run, records, out, monkeypatch):
    """train.train_step on a given rollout (its sampler replaced by `out`)."""
    monkeypatch.setattr(train, "sample", lambda run, prompt, n: out)
    return train.train_step(run, records)


def test_label_samples_vote_over_n_and_train_on_g(tiny_model_dir, slake_folder, monkeypatch):
    """N = 4 samples, G = 2 trained. Group answers "a b b b": the majority of all 4 is "b", while the majority of
    the first 2 alone would be "a". The trained answers "a", "b" then get exact-match rewards 0, 1."""
    G, N = 2, 4
    policy, tokenizer, image_processor = modeling.load(tiny_model_dir, "cpu")
    records = data.load_split("slake", slake_folder, "test")[:1]
    prompt = rollout.build_inputs(tokenizer, image_processor, records)
    out = rollout.sample(policy, tokenizer, prompt, N, 6, 1.0, 1.0, torch.Generator().manual_seed(0))
    out = rollout.Rollout(out.completion_ids, out.completion_mask, ["a", "b", "b", "b"])
    for n, expected_label, expected_rewards in [(N, "b", [0.0, 1.0]), (G, "a", [1.0, 0.0])]:
        args = train.parse_args(["--model", str(tiny_model_dir), "--group-size", str(G), "--label-samples", str(n),
                                 "--pseudo-label", "majority", "--reward", "exact", "--kl-coef", "0"])
        run = setup.make_run(args, policy, tokenizer, image_processor)
        stats, result = step_on(run, records, out if n == N else rollout.first_of_each_group(out, N, G), monkeypatch)
        assert result.label_texts == [expected_label]
        assert result.rewards.tolist() == expected_rewards
        assert result.texts == ["a", "b"]  # the first G are trained
    assert stats["consensus"] == pytest.approx(0.5)  # N = G: 1 of the 2 answers equals the label "a"


def test_label_samples_fpl_sees_the_extra_answers_as_one_forward_would(tiny_model_dir, slake_folder):
    """The hidden states of the N - G extra answers (a forward without gradient) equal those of one
    teacher-forced pass over all N, so FPL's centroid over N is the same as computed in one go."""
    G, N = 2, 5
    policy, tokenizer, image_processor = modeling.load(tiny_model_dir, "cpu")
    records = data.load_split("slake", slake_folder, "test")[:2]
    prompt = rollout.build_inputs(tokenizer, image_processor, records)
    out = rollout.sample(policy, tokenizer, prompt, N, 6, 1.0, 1.0, torch.Generator().manual_seed(0))
    args = train.parse_args(["--model", str(tiny_model_dir), "--group-size", str(G), "--label-samples", str(N)])
    run = setup.make_run(args, policy, tokenizer, image_processor)
    trained = rollout.first_of_each_group(out, N, G)
    _, hidden = rollout.completion_logits_and_hidden(policy, prompt, trained.completion_ids,
                                                     trained.completion_mask, G)
    timings = {}
    mixed = label_samples.all_hidden(run, prompt, out, hidden, timings)
    _, direct = rollout.completion_logits_and_hidden(policy, prompt, out.completion_ids, out.completion_mask, N)
    assert mixed.shape == direct.shape and timings["label_forward"] > 0
    torch.testing.assert_close(mixed, direct, atol=1e-5, rtol=1e-5)


def test_label_samples_below_group_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--label-samples 4: must be >= --group-size"):
        train.main(["--out-dir", str(tmp_path / "run"), "--label-samples", "4", "--group-size", "8"])


def test_consensus_hand_worked():
    texts = ["Yes", "yes.", "no", "no",  # label "yes" (index 0): 2 of 4 agree
             "liver", "the liver", "Liver", "kidney"]  # label "liver" (index 2): 3 of 4 agree
    assert centroid.label_shares(texts, 4, ["Yes", "liver"]) == pytest.approx([2 / 4, 3 / 4])


def test_answer_statistics_hand_worked():
    types = ["CLOSED", "CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN"]
    questions = ["Is it a CT?", "Is it a CT?", "Is it a CT?", "Is it normal?", "Which organ?", "Which organ?"]
    records = [{"answer_type": t, "question": q} for t, q in zip(types, questions)]
    preds = ["No", "no.", "yes", "No", "liver", "Liver"]
    stats = evaluate.answer_statistics(records, preds)
    assert stats["closed_top_share"] == pytest.approx(3 / 4)  # "no" answers 3 of the 4 closed questions
    p = [3 / 6, 1 / 6, 2 / 6]  # no, yes, liver over all 6 answers
    assert stats["answer_entropy"] == pytest.approx(-sum(x * math.log(x) for x in p))
    # repeated texts: "Is it a CT?" (top "no": 2 of 3), "Which organ?" (top "liver": 2 of 2); "Is it normal?" once
    assert stats["same_question_top_share"] == pytest.approx((2 + 2) / (3 + 2))


# ----------------------------------------------------------------------------------------------
# --stop-on-collapse on constructed runs: the model trains for real, its greedy answers are replaced


HEALTHY = ["Yes", "No", "CT", "Left Lung"]  # per question of each image: the answers before training
COLLAPSED = ["No", "No", "No", "No"]


def constructed_predictions(monkeypatch, sequence):
    """evaluate.predict returns the next canned answer set for each evaluation (step 0, 1, 2, ...)."""
    answers = iter(sequence)
    monkeypatch.setattr(evaluate, "predict", lambda model, tok, proc, records, **kw: [
        answer_set[i % 4] for answer_set in [next(answers)] for i in range(len(records))])


def run_with_monitor(tiny_model_dir, slake_folder, out_dir):
    argv = ["--model", str(tiny_model_dir), "--data-root", str(slake_folder), "--dataset", "slake",
            "--out-dir", str(out_dir), "--questions-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--max-steps", "3", "--eval-every", "1", "--stop-on-collapse", "--lr", "1e-3"]
    train.main(argv)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_on_collapse_fires_and_keeps_the_last_healthy_checkpoint(tiny_model_dir, slake_folder, tmp_path,
                                                                       monkeypatch, capsys):
    constructed_predictions(monkeypatch, [HEALTHY, HEALTHY, COLLAPSED, HEALTHY])
    rows = run_with_monitor(tiny_model_dir, slake_folder, tmp_path)
    assert [r["step"] for r in rows if "eval" not in r] == [1, 2]  # stopped at step 2's evaluation
    assert [r["closed_top_share"] for r in rows if "eval" in r] == [0.5, 0.5, 1.0]
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    assert "collapse: one answer to 100.0% of the CLOSED questions" in capsys.readouterr().out


def test_stop_on_collapse_stays_quiet_on_a_healthy_run(tiny_model_dir, slake_folder, tmp_path, monkeypatch):
    constructed_predictions(monkeypatch, itertools.repeat(HEALTHY))
    rows = run_with_monitor(tiny_model_dir, slake_folder, tmp_path)
    assert [r["step"] for r in rows if "eval" not in r] == [1, 2, 3]
    assert [r["eval"] for r in rows if "eval" in r] == ["step0", "step1", "step2", "final"]
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 3


def test_collapse_criterion():
    args = train.parse_args(["--stop-on-collapse", "--eval-every", "1"])
    base = {"closed_top_share": 0.55, "answer_entropy": 2.0}
    assert monitor.collapse_reason({"closed_top_share": 0.8, "answer_entropy": 1.5}, base, args) is None
    assert "CLOSED" in monitor.collapse_reason({"closed_top_share": 0.95, "answer_entropy": 1.5}, base, args)
    assert "entropy" in monitor.collapse_reason({"closed_top_share": 0.6, "answer_entropy": 0.9}, base, args)
    one_sided = {"closed_top_share": 0.95, "answer_entropy": 2.0}  # already one-sided before training
    assert monitor.collapse_reason({"closed_top_share": 0.97, "answer_entropy": 1.9}, one_sided, args) is None
