"""Label samples (TTRL's protocol): the pseudo label is chosen from N > G samples per question, GRPO trains on
the first G of them (TTRL votes on 64 answers and trains on 32).

`--label-samples N` (default G: off). The rollout samples N answers per question; the policy's teacher-forced
pass covers the G trained ones, so the hidden states of the other N - G come from one more forward without
gradient: the only extra cost of the rule. The labelers and the novelty reward then see all N answers
(rules.Batch.texts, .emb); the rewards, advantages and the update see the trained G.
"""

import torch

import centroid
import rollout
from scale import parallel


def embeddings(run, prompt, out, hidden, timings):
    """The answer embeddings of all N label samples [B*N, D]: the trained rows' from the policy's pass (hidden
    [B*G, T, D]), the other N - G rows' from one more forward without gradient."""
    return centroid.answer_embeddings(all_hidden(run, prompt, out, hidden, timings).detach().float(),
                                      out.completion_mask)


def all_hidden(run, prompt, out, hidden, timings):
    N, G = run.args.label_samples, run.args.group_size
    if N == G:
        return hidden
    extra_rows = rollout.select_rows(out, [r for r in range(out.completion_ids.shape[0]) if r % N >= G])
    with torch.no_grad(), parallel.timed(timings, "label_forward", run.device):
        _, extra = rollout.teacher_forced(run.policy, prompt, extra_rows, N - G, run.dtype)  # [B*(N-G), T, D]
    B, T = out.completion_ids.shape[0] // N, hidden.shape[1]
    return torch.cat([hidden.detach().view(B, G, T, -1), extra.view(B, N - G, T, -1)], dim=1).flatten(0, 1)


# ----------------------------------------------------------------------------------------------
# Flags and checks


def add_flags(group):
    group.add_argument("--label-samples", type=int, default=None,
                       help="answers sampled per question to choose the pseudo label from (N >= G; default G): "
                            "majority vote or FPL over all N, GRPO on the first G (TTRL votes on 64, trains on 32)")


def check(args):
    if args.label_samples < args.group_size:
        raise SystemExit(f"--label-samples {args.label_samples}: must be >= --group-size ({args.group_size}); the "
                         f"pseudo label is chosen from N samples, G of which are trained on")
