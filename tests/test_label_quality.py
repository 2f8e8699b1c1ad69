"""Label quality where the gradient flows, the noisy oracle, image sensitivity and the premise check:
each number on hand-built groups with a known answer, then end to end on a tiny random model."""

import json
import math
import random

import pytest
import torch

import centroid
import data
import evaluate
import model as modeling
import monitor
import reward
import rules
import train
from experiments import ablate
from rules import oracle


ORACLES = ("oracle", "noisy-oracle")  # the ablations that read labels


# ----------------------------------------------------------------------------------------------
# Contested groups, contested hit rate, reward accuracy, flips


def test_a_unanimous_group_is_not_contested():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0,  # unanimous: every answer equals the label
                            1.0, 0.0, 0.0, 1.0,  # split
                            0.3, 0.3, 0.3, 0.3])  # equal soft scores: zero advantage too
    assert monitor.contested_groups(rewards, 4).tolist() == [False, True, False]
    assert train.grpo.group_advantages(rewards, 4).view(3, 4).abs().sum(dim=1).tolist()[0::2] == [0.0, 0.0]


def test_reward_accuracy_is_zero_when_a_wrong_label_inverts_every_reward():
    """Answers "a b b a", pseudo label "a" (wrong), truth "b": exact-match rewards [1, 0, 0, 1] against the
    label, [0, 1, 1, 0] against the truth, so no answer gets the reward the truth would give."""
    texts = ["a", "b", "b", "a"]
    assert monitor.reward_agreement(texts, 4, ["a"], ["b"]) == [False] * 4
    assert monitor.reward_agreement(texts, 4, ["b"], ["b"]) == [True] * 4
    # TTRL's lucky hit: a wrong label "c" still gives the right reward 0 to the wrong answers "a"
    assert monitor.reward_agreement(["a", "b", "a", "a"], 4, ["c"], ["b"]) == [True, False, True, True]


def test_label_quality_counts_and_rates_hand_worked():
    """Three groups of G = 2: contested, unanimous, contested. Labels right in groups 0 and 1; the greedy
    answer right in groups 1 and 2. Over the 2 contested groups: label right 1/2, greedy right 1/2."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    texts = ["yes", "no", "CT", "CT", "liver", "lung"]
    counts = monitor.label_quality_counts(rewards, 2, texts, ["yes", "CT", "lung"], ["yes", "CT", "liver"],
                                          [True, True, False], [False, True, True])
    assert counts == {"groups": 3, "contested": 2, "contested_hit": 1, "contested_greedy": 1, "answers": 6,
                      "reward_agree": 4}  # group 2: label "lung" is wrong, so both of its rewards are wrong
    rates = monitor.label_quality(dict(counts, reward=0.5))
    assert rates == {"reward": 0.5, "contested_share": 2 / 3, "contested_hit_rate": 0.5,
                     "contested_greedy_rate": 0.5, "reward_accuracy": 4 / 6}


def test_label_quality_is_null_without_labels():
    counts = monitor.label_quality_counts(torch.tensor([1.0, 0.0]), 2, ["a", "b"], ["a"], [None], None, [None])
    rates = monitor.label_quality(counts)
    assert rates.pop("contested_share") == 1.0  # label-free
    assert all(math.isnan(v) for v in rates.values())


def test_flips_hand_worked():
    before = {1: True, 2: True, 3: False, 4: False, 5: None}
    after = {1: True, 2: False, 3: True, 4: False, 5: True, 6: True}  # 5 unlabelled, 6 new: not counted
    assert monitor.flips(before, after) == {"flips_right_to_wrong": 1, "flips_wrong_to_right": 1}


# ----------------------------------------------------------------------------------------------
# The noisy oracle


def test_noisy_oracle_has_the_asked_accuracy():
    """1000 groups, each with the truth and wrong answers among its samples: at p = 0.7 the label is the truth
    for 70 +- 3% of them, and otherwise the group's most frequent wrong answer."""
    rng = random.Random(0)
    texts, truths = [], []
    for _ in range(1000):
        texts += ["yes", "no", "no", "maybe"]
        truths.append("Yes")
    draws = [rng.random() for _ in truths]
    labels = oracle.noisy_oracle_labels(texts, 4, truths, 0.7, draws)
    right = sum(label == "Yes" for label in labels) / len(labels)
    assert abs(right - 0.7) <= 0.03
    assert set(labels) == {"Yes", "no"}  # a wrong label is the most frequent wrong answer, "no" (2 of 3)


def test_noisy_oracle_keeps_the_truth_when_no_answer_is_wrong():
    labels = oracle.noisy_oracle_labels(["CT", "ct.", "MRI", "CT"], 2, ["CT", "CT"], 0.0, [0.9, 0.9])
    assert labels == ["CT", "MRI"]  # group 0: both answers right, so the label cannot be wrong


def test_noisy_oracle_rewards_are_hsr_against_the_label():
    """The label "no" is in the group (index 1): exact tier for "no", soft tier from F1 and the cosine to
    answer 1's embedding for the others; a label from outside the group gives cosine 0."""
    texts = ["yes", "no", "no there is not"]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    cos = centroid.cosine_to_label_texts(emb, texts, 3, ["No"])
    torch.testing.assert_close(cos, torch.tensor([0.0, 1.0, 0.8]))
    assert rules.REWARDS["noisy-oracle"] is rules.REWARDS["hsr"]  # HSR, against the noisy labeler's label
    rewards = reward.hsr_rewards(texts, centroid.label_of_each_answer(["No"], 3), cos)
    f1 = reward.token_f1("no there is not", "No")
    torch.testing.assert_close(rewards, torch.tensor([0.0, 1.0, 0.5 * (0.5 * f1 + 0.5 * 0.8)]))
    outside = centroid.cosine_to_label_texts(emb, texts, 3, ["liver"])
    assert outside.tolist() == [0.0, 0.0, 0.0]


def test_label_free_rows_never_read_a_label(tiny_model_dir, unlabeled_slake_folder, tmp_path):
    """Every label-free row of the ablation trains on a split without answers (the collapse-resistant rules of
    issue 18 included: consensus filter, EMA teacher, novelty, entropy); the oracle ablations refuse it."""
    label_free = [flags for _, _, flags in ablate.ROWS if flags[flags.index("--reward") + 1] not in ORACLES]
    assert len(label_free) == 14  # TTRL, FPL + exact, majority + HSR, Med-Evo, the two with N = 32, and the 8
    fast = ["--model", str(tiny_model_dir), "--data-root", str(unlabeled_slake_folder), "--dataset", "slake",
            "--questions-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "1",
            "--eval-batch-size", "12", "--no-image-sensitivity"]
    for i, flags in enumerate(label_free):
        train.main([*fast, "--out-dir", str(tmp_path / str(i)), *flags])
        rows = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        step = next(r for r in rows if "eval" not in r)
        assert step["contested_hit_rate"] is None and step["reward_accuracy"] is None and step["hit_rate"] is None
        assert 0 <= step["contested_share"] <= 1  # label-free
    for kind in ORACLES:
        with pytest.raises(SystemExit, match=f"--reward {kind} reads"):
            train.main([*fast, "--out-dir", str(tmp_path / kind), "--reward", kind])


# ----------------------------------------------------------------------------------------------
# Image sensitivity and the premise check


def blind(model):
    """The same model with its vision merger's output zeroed: its answers cannot depend on the image."""
    for p in model.model.visual.merger.mlp[-1].parameters():
        torch.nn.init.zeros_(p)
    return model


def test_image_sensitivity_is_zero_for_a_model_that_ignores_its_image(tiny_model_dir, slake_folder):
    records = data.load_split("slake", slake_folder, "test")
    model, tokenizer, image_processor = modeling.load(tiny_model_dir, "cpu")
    options = dict(batch_size=12, prompt_suffix=" Answer.", max_new_tokens=6)
    greedy = evaluate.predict(model, tokenizer, image_processor, records, **options)
    grey = monitor.grey_answers(model, tokenizer, image_processor, records, **options)
    assert monitor.image_sensitivity(greedy, grey) > 0  # the random model does look at its (random) images
    blind(model)
    greedy = evaluate.predict(model, tokenizer, image_processor, records, **options)
    grey = monitor.grey_answers(model, tokenizer, image_processor, records, **options)
    assert monitor.image_sensitivity(greedy, grey) == 0.0


def test_premise_check_end_to_end(tiny_model_dir, slake_folder, tmp_path, capsys):
    out = tmp_path / "premise.json"
    numbers = evaluate.main(["--premise", "--dataset", "slake", "--data-root", str(slake_folder), "--model",
                             str(tiny_model_dir), "--samples", "4", "--max-new-tokens", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["verdict"] == numbers["verdict"] and saved["n_questions"] == 12
    for key in ("majority", "fpl"):
        q = saved[key]
        assert 0 <= q["contested_share"] <= 1 and 0 <= q["reward_accuracy"] <= 1
        assert q["contested_questions"] == round(q["contested_share"] * 12)
    printed = capsys.readouterr().out
    assert "greedy score" in printed and "majority vote (TTRL)" in printed and "FPL (Med-Evo)" in printed


def test_premise_verdict_reads_the_numbers():
    q = {"contested_questions": 41, "contested_share": 0.41, "contested_label_right": 0.41,
         "contested_greedy_right": 0.58}
    verdict = monitor.premise_verdict({"majority": q, "fpl": dict(q, contested_label_right=0.7)})
    assert "right 41.0% of the time and the greedy answer 58.0%: the reward pushes toward worse" in verdict
    assert "right 70.0% of the time and the greedy answer 58.0%: the reward pushes toward better" in verdict
    level = monitor.premise_verdict({"majority": dict(q, contested_label_right=0.57), "fpl": q})
    assert "right 57.0% of the time and the greedy answer 58.0%: the label is no better" in level


# ----------------------------------------------------------------------------------------------
# The per-row dev protocol and the break-even accuracy (ablate.py)


def test_dev_choice_includes_no_adaptation_and_it_wins_ties():
    logged = [{"step": 0, "eval": "step0", "overall": 0.70}, {"step": 10, "reward": 0.5},
              {"step": 143, "eval": "step143", "overall": 0.69}, {"step": 286, "eval": "step286", "overall": 0.70},
              {"step": 429, "eval": "final", "overall": 0.72}]
    candidates = ablate.dev_candidates(logged, "1e-5", 143)
    assert [(c["epochs"], c["steps"]) for c in candidates] == [(1, 143), (2, 286), (3, 429)]
    none = {"lr": None, "epochs": 0, "steps": 0, "overall": 70.0}
    assert ablate.choose_setting([none] + candidates)["steps"] == 429
    assert ablate.choose_setting([none] + candidates[:2])["lr"] is None  # 70.0 = 70.0: not adapting wins
    settings = {"rows": {"ttrl": {"choice": none}, "oracle": {"choice": candidates[2]}}}
    assert ablate.row_setting("ttrl", settings) is None
    assert ablate.row_setting("noisy-0.7", settings) == ["--lr", "1e-5", "--epochs", "3", "--kl-coef", "0.04"]
    with pytest.raises(SystemExit, match="no dev choice for row 'medevo'"):
        ablate.row_setting("medevo", settings)


def test_break_even_is_where_the_sweep_crosses_the_base_model():
    def cell(x):
        return {"mean": x, "std": 0.0, "values": [x]}

    table = {"base model (no adaptation)": {"overall": cell(70.0)},
             "TTRL": {"overall": cell(60.0), "hit_start": cell(60.0), "contested_hit_rate": cell(45.0)}}
    rows = [("ttrl", "TTRL", [])]
    for p, score, contested in [("0.5", 60.0, 40.0), ("0.6", 66.0, 50.0), ("0.7", 74.0, 60.0)]:
        table[f"noisy {p}"] = {"overall": cell(score), "hit_rate": cell(float(p)),
                               "contested_hit_rate": cell(contested)}
        rows.append((f"noisy-{p}", f"noisy {p}", []))
    result = ablate.break_even(table, rows)
    assert result["p_star"] == pytest.approx(0.6 + 0.1 * 4 / 8)  # 66 -> 74 crosses 70 halfway
    assert result["p_star_contested"] == pytest.approx(55.0)  # halfway between 50 and 60 measured on contested groups
    assert result["label_free_contested_hit_rate"] == {"TTRL": cell(45.0)}
