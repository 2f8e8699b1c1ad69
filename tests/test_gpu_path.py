"""The GPU path on CPU: NaN-safe steps, lean loading, one FSDP forward per teacher-forced pass, fp32 log-probs,
bounded images, a sharded reference, --offload, the out-dir and timeout checks, and the sampler's lagged stop.

The two-process checks run tests/gpu_path_check.py and tests/lean_load_check.py under torchrun with gloo;
bf16 compute runs on CPU where the dtype matters. What only a GPU can run (cuDNN attention, NCCL, pinned
memory) is reached here up to the device check, or argued in docs/scale.md."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import bench
import evaluate
import model as modeling
from scale import parallel
import rollout
from models import tiny
import train
from conftest import CORPUS

REPO = Path(__file__).resolve().parents[1]


def torchrun(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ----------------------------------------------------------------------------------------------
# Two processes, FSDP2 over gloo


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, slake_folder, tmp_path_factory):
    """tests/gpu_path_check.py's results, without and with --offload."""
    runs = {}
    for mode in ("plain", "offload"):
        folder = tmp_path_factory.mktemp(mode)
        torchrun("tests/gpu_path_check.py", str(tiny_model_dir), str(slake_folder), str(folder),
                 str(folder / "out.json"), mode)
        runs[mode] = (json.loads((folder / "out.json").read_text()), torch.load(folder / "out.pt"))
    return runs


@pytest.mark.parametrize("mode", ["plain", "offload"])
def test_sharded_load_teacher_forced_pass_and_step0(two_process_runs, mode):
    """Rank 0 alone reads the files; both models hold their weights; the teacher-forced pass is one FSDP forward
    (one root claim, all 5 units inside it); at step 0 the policy's fp32 log-probs equal the reference's exactly."""
    r, _ = two_process_runs[mode]
    assert r["policy_equals_files"] and r["reference_equals_files"] and r["same_keys"] and r["buffers_equal"]
    assert r["masters_fp32"] and r["shards_on_cpu"] and r["reference_frozen"]
    assert r["fsdp_units"] == 2 + 2 + 1  # 2 decoder layers, 2 vision blocks, the root
    units = ["Qwen2_5_VLForConditionalGeneration"] + 2 * ["Qwen2_5_VLVisionBlock"] + 2 * ["Qwen2_5_VLDecoderLayer"]
    assert r["root_claims"] == r["reference_root_claims"] == units[:1]
    assert r["unit_forwards"] == units  # every unit gathered inside that one forward
    before = r["root_claims_before"]  # the submodules called directly: every unit claimed the root, some twice
    assert sorted(set(before)) == sorted(set(units)) and len(before) >= len(units)
    assert r["logits_dtype"] == "torch.float32"
    assert r["kl_step0"] == 0.0 and r["logp_equal_reference"]  # needs the vision blocks' cos / sin left in fp32


@pytest.mark.parametrize("mode", ["plain", "offload"])
def test_nan_on_one_rank_skips_the_step_on_every_rank(two_process_runs, mode):
    r, _ = two_process_runs[mode]
    assert r["first_skipped"] == ["non-finite gradient"] * 2
    assert r["first_grad_norm_finite"] == [False, False]
    assert r["unchanged_after_skip"] == [True, True] and r["optimizer_state_after_skip"] == 0
    assert r["second_skipped"] == [None, None]
    assert all(changed > 0 for changed in r["changed_after_second"])  # the next step updates both ranks' shards


def test_offload_updates_as_without(two_process_runs):
    """The same two steps with the masters, gradients and AdamW state in host memory give the same weights."""
    plain, offload = two_process_runs["plain"][1], two_process_runs["offload"][1]
    assert plain.keys() == offload.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(offload[name], weight, rtol=0, atol=1e-6, msg=name)


def test_timeout_and_shared_out_dir(two_process_runs):
    r, _ = two_process_runs["plain"]
    assert r["timeout"] == "0:07:00"
    assert r["shared_left_clean"]  # rank 0's token is gone again
    assert r["refused_on"] == [True, True]  # every rank stops, not only the blind one
    assert "rank 1 on" in r["refused"] and "cannot read the file rank 0 wrote" in r["refused"]
    assert "rank 0 on" not in r["refused"]


def test_lean_loading_holds_one_copy_on_rank0_and_shards_elsewhere(tmp_path):
    """A ~125M-parameter random Qwen2.5-VL, policy (fp32) and reference (bf16) loaded over 2 processes. Each rank's
    own shards are 1/2 of the fp32 copy + 1/2 of the bf16 one = 0.75 copy (on a GPU they would be in GPU memory).
    Rank 0 maps the checkpoint file (one full copy, as page cache) and allocates no other full copy; rank 1 holds
    nothing but its shards. Loading every rank from the files, as before, costs each rank 1.5 copies of its own."""
    folder = tiny.build_random_tiny(tmp_path / "mid", CORPUS, hidden=1024, layers=12, heads=8, vision_hidden=512,
                                    vision_depth=4)
    torchrun("tests/lean_load_check.py", str(folder), str(tmp_path / "rss.json"))
    r = json.loads((tmp_path / "rss.json").read_text())
    copy, (rank0, rank1) = r["fp32_bytes"], r["rises"]
    assert 100e6 * 4 < copy < 200e6 * 4
    assert rank0["anon"] < 1.2 * copy, (r, copy)  # its shards and one tensor in flight, never a second full copy
    assert rank0["rss"] < (1.0 + 0.75 + 0.2) * copy, (r, copy)  # + the file's pages while it reads them
    assert rank1["rss"] < 0.9 * copy and rank1["anon"] < 0.9 * copy, (r, copy)  # its shards only


def test_end_worker_skips_the_teardown_only_under_torchrun():
    """A finished torchrun worker ends without the interpreter's teardown (where gloo's surviving threads abort
    it), its output flushed; plain python exits as usual."""
    code = ("import atexit; from scale import parallel; atexit.register(print, 'teardown'); print('done'); parallel.end_worker(); "
            "print('not reached')")
    plain = {k: v for k, v in os.environ.items() if k != "RANK"}
    for env, expected in [(dict(plain, RANK="0"), "done\n"), (plain, "done\nnot reached\nteardown\n")]:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout == expected, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# NaN-safe steps, one process


def test_non_finite_gradients_stop_the_run(tiny_model_dir, slake_folder, tmp_path, monkeypatch, capsys):
    """Every gradient NaN: each step is skipped and logged so; after --max-skipped-steps in a row the run stops
    (exit status 1) naming the last good checkpoint, and no checkpoint of the skipped steps is written."""
    real_clip = parallel.clip_gradients

    def nan_gradients(model, max_norm):
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return real_clip(model, max_norm)

    monkeypatch.setattr(parallel, "clip_gradients", nan_gradients)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", str(tiny_model_dir), "--data-root", str(slake_folder), "--dataset", "slake",
                    "--out-dir", str(out), "--questions-per-step", "2", "--group-size", "4", "--max-new-tokens", "4",
                    "--max-steps", "5", "--max-skipped-steps", "2", "--grad-clip", "0", "--save-every", "5"])
    assert stop.value.code == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["skipped"] == "non-finite gradient" and r["grad_norm"] is None for r in steps)
    printed = capsys.readouterr().out
    assert "stopped at step 2/5 by non-finite gradients: 2 steps in a row skipped" in printed
    assert "last good checkpoint: none: no checkpoint was written" in printed
    assert not (out / "checkpoint").exists()


def test_grad_norm_is_logged_without_clipping(tiny_model_dir, slake_folder, tmp_path):
    train.main(["--model", str(tiny_model_dir), "--data-root", str(slake_folder), "--dataset", "slake",
                "--out-dir", str(tmp_path), "--questions-per-step", "2", "--group-size", "4", "--max-new-tokens", "4",
                "--max-steps", "1", "--grad-clip", "0"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "eval" not in r)
    assert row["grad_norm"] > 0 and "skipped" not in row


# ----------------------------------------------------------------------------------------------
# fp32 log-probs under bf16


def test_bf16_logprobs_match_fp32_recomputation(tiny, image_records):
    """A bf16 model: the answer logits come out fp32, equal to a float64 product of the same hidden states and
    head weight, so the log-probs are off by ~1e-6, where rounding the logits to bf16 moves them by ~1e-2."""
    model, tokenizer, image_processor = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records[:2])
    out = rollout.sample(model, tokenizer, prompt, 2, 6, 1.0, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, hidden = rollout.completion_logits_and_hidden(bf16, prompt, out.completion_ids, out.completion_mask, 2)
    assert logits.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    exact = hidden[:, :-1].double() @ bf16.lm_head.weight.double().T  # logits position i + 1 <-> hidden position i
    logp = torch.log_softmax(logits[:, 1:].double(), -1)
    logp_exact = torch.log_softmax(exact, -1)
    logp_bf16 = torch.log_softmax(exact.to(torch.bfloat16).double(), -1)
    assert (logp - logp_exact).abs().max() < 1e-4
    assert (logp_bf16 - logp_exact).abs().max() > 1e-2  # what the bf16 head gave before


def test_fp32_logits_unchanged(tiny, image_records):
    """In fp32 the head is the same product as lm_head's (the offline runs keep their numbers)."""
    model, tokenizer, image_processor = tiny
    hidden = torch.randn(3, 5, model.config.text_config.hidden_size)
    assert torch.equal(rollout.answer_logits(model, hidden), model.lm_head(hidden))


# ----------------------------------------------------------------------------------------------
# The sampler: no host sync per token on GPU, the same tokens


def test_lagged_stop_draws_the_same_tokens(tiny, image_records, monkeypatch):
    """Reading "every row finished" one token late (the CUDA default) gives the tokens and leaves the generator
    as the immediate check does: the extra decode step draws nothing. Row r is made to stop at token r % 5 + 2."""
    model, tokenizer, image_processor = tiny
    eos = rollout.eos_token_ids(model, tokenizer)[0]
    real_next_tokens, drawn = rollout.next_tokens, []

    def stopping(logits, temperature, top_p, generator):
        token = real_next_tokens(logits, temperature, top_p, generator)  # the draw happens either way
        drawn.append(token)
        stop = torch.arange(len(token)) % 5 + 2 <= len(drawn)
        return torch.where(stop, torch.full_like(token, eos), token)

    monkeypatch.setattr(rollout, "next_tokens", stopping)
    prompt = rollout.build_inputs(tokenizer, image_processor, image_records[:3])
    draws = {}
    for lagged in (False, True):
        drawn.clear()
        generator = torch.Generator().manual_seed(3)
        out = rollout.sample(model, tokenizer, prompt, 4, 12, 1.0, 0.9, generator, lagged_stop=lagged)
        draws[lagged] = (out.completion_ids, torch.rand(4, generator=generator), len(drawn))
    assert torch.equal(draws[True][0], draws[False][0]) and torch.equal(draws[True][1], draws[False][1])
    assert draws[True][2] == draws[False][2] == draws[False][0].shape[1] == 6  # stopped at 6 of 12 tokens


def test_top_p_masked_fill_keeps_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    drawn = rollout.next_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}


# ----------------------------------------------------------------------------------------------
# Bounded images


def test_default_pixel_flags_leave_small_images_untouched(tiny, image_records):
    """The defaults cap at 4,194,304 pixels and keep the processor's own minimum: the tiny model's inputs are
    byte-identical; a smaller cap gives fewer image tokens, and the start-up line says how many."""
    model, tokenizer, image_processor = tiny
    before = rollout.build_inputs(tokenizer, image_processor, image_records)
    processor = type(image_processor).from_dict(image_processor.to_dict())
    line = modeling.apply_pixel_flags(processor, modeling.DEFAULT_MAX_PIXELS, None, image_records)
    after = rollout.build_inputs(tokenizer, processor, image_records)
    assert all(torch.equal(before[k], after[k]) for k in before)
    few, many = modeling.image_token_range(processor, image_records)
    per_image = (before["image_grid_thw"].prod(1) // 4).tolist()
    assert (few, many) == (min(per_image), max(per_image)) and f"{few}-{many} image tokens" in line
    modeling.apply_pixel_flags(processor, 56 * 56, None, image_records)
    capped = rollout.build_inputs(tokenizer, processor, image_records)
    assert (capped["image_grid_thw"].prod(1) // 4).max() <= 4 < many


@pytest.mark.parametrize("flags, message", [
    (["--max-pixels", "100"], "--max-pixels 100"),
    (["--min-pixels", "0"], "--min-pixels 0"),
    (["--max-pixels", "10000", "--min-pixels", "20000"], "--min-pixels 20000"),
])
def test_bad_pixel_flags_are_refused_before_any_work(flags, message, tmp_path):
    for main, argv in [(train.main, ["--out-dir", str(tmp_path / "run")]), (evaluate.main, []),
                       (bench.main, ["--out", str(tmp_path / "bench.json")])]:
        with pytest.raises(SystemExit, match=message):
            main(argv + flags)
    assert not (tmp_path / "run").exists() and not (tmp_path / "bench.json").exists()


# ----------------------------------------------------------------------------------------------
# cuDNN attention off on CUDA, in every entry point


def test_cudnn_attention_switched_off_when_cuda(monkeypatch):
    """Faking only the device check: on CUDA the cuDNN SDPA backend is disabled; on CPU nothing is touched."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        modeling.disable_cudnn_attention()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        modeling.disable_cudnn_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("main", [train.main, evaluate.main, bench.main])
def test_every_entry_point_switches_cudnn_attention_first(main, monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(modeling, "disable_cudnn_attention", lambda: called.append(True))
    with pytest.raises(SystemExit):
        main(["--max-pixels", "1"])  # refused at once: the switch came before
    assert called == [True]


# ----------------------------------------------------------------------------------------------
# Flags that reach the process group


def test_timeout_and_offload_reach_the_process_group(monkeypatch, tmp_path):
    seen = []

    def fake_setup(device, timeout_minutes, cpu_collectives):
        seen.append((timeout_minutes, cpu_collectives))
        return 0, 1, torch.device("cpu")

    monkeypatch.setattr(parallel, "setup_distributed", fake_setup)
    with pytest.raises(SystemExit, match="--offload is FSDP2's offload: run under torchrun"):
        train.main(["--out-dir", str(tmp_path / "run"), "--dist-timeout-minutes", "45", "--offload"])
    assert seen == [(45.0, True)]
    with pytest.raises(SystemExit, match="--dist-timeout-minutes 0.0: must be > 0"):
        train.main(["--out-dir", str(tmp_path / "run"), "--dist-timeout-minutes", "0"])
    assert not (tmp_path / "run").exists()
