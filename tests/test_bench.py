"""bench.py's answer-token count on a hand-made batch: EOS counted, padding after it not."""

import torch

import bench


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
