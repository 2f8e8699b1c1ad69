"""bench.py: the answer-token count on a hand-made batch (EOS counted, padding after it not); --train-flags checked."""

import pytest
import torch

from experiments import bench


def test_count_answer_tokens_includes_eos_excludes_padding():
    eos_ids, pad = [7, 9], 0  # two EOS ids (like <|im_end|>, <|endoftext|>), padding distinct from both
    ids = torch.tensor([
        [5, 6, 7, pad, pad],  # 2 tokens + EOS, then padding
        [5, 9, pad, pad, pad],  # stopped by the second EOS id
        [1, 2, 3, 4, 5],  # never stopped: every token is real
        [7, pad, pad, pad, pad],  # EOS straight away: one token
        [3, 7, 9, 7, pad],  # only the first EOS ends the answer
    ])
    assert bench.count_answer_tokens(ids, eos_ids).tolist() == [3, 2, 5, 1, 2]


def test_train_flags_are_train_flags_checked_before_any_model_loads():
    args = bench.parse_args(["--train-flags=--pseudo-label majority --reward exact --ema-teacher", "--questions", "4"])
    step = bench.train_step_args(args)  # what the measured step runs: the bench's batch, then the row's rules
    assert (step.pseudo_label, step.reward, step.ema_teacher, step.questions_per_step) == ("majority", "exact", True, 4)
    with pytest.raises(SystemExit, match="--train-flags '--reward nope'"):
        bench.parse_args(["--train-flags=--reward nope"])
