"""The GPU check: what only a GPU can show, prepared on CPU, in one command of at most 8 minutes on one H100.

    python -m experiments.gpu_check --out gpu_check.json        # on a GPU machine (no network needed)
    python -m experiments.gpu_check --smoke --out /tmp/gc.json  # the same code on CPU with a tiny model (tests)

  1. cuDNN attention: model.disable_cudnn_attention switches SDPA's cuDNN backend off; then a bf16 forward and
     backward of the random 3B configuration at 320 tokens (128 k + 64: pytorch#196678's condition) with an
     explicit attention mask (left padding) must give finite gradients. For the record, the same with cuDNN on.
  2. The shared-prefix teacher-forced pass (issue 26) in bf16 SDPA with its 4-D mask: its logits and hidden states
     against the unshared pass, and both passes' time.
  3. train.py, 2 steps of the random 3B configuration with --dtype bfloat16 --gradient-checkpointing --eval-every 1,
     with --offload (every layer) and without (fewer layers, so that it fits one 80 GB GPU: memory.py plans 79 GB
     for all 36): the exit code, the peak GPU memory the run logs, the peak host memory, and the plan it printed.
Everything lands in --out (JSON); a part that fails is recorded there and the others still run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import model as modeling
import rollout
from experiments import bench
from models import tiny

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [("What modality is used to take this image?", "CT", "OPEN"), ("Is there a lesion?", "Yes", "CLOSED"),
             ("Where is the lesion?", "Left Lung", "OPEN"), ("Is this a CT scan?", "No", "CLOSED")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The checks that need a GPU, in one run (at most 8 minutes on one H100).")
    p.add_argument("--out", default="gpu_check.json", help="where the results go (JSON)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU: the code paths, not the GPU")
    p.add_argument("--tokens", type=int, default=320, help="part 1's sequence length (128 k + 64)")
    p.add_argument("--layers-without-offload", type=int, default=18,
                   help="part 3 without --offload: text layers / vision blocks kept of the 3B configuration")
    p.add_argument("--parts", nargs="+", default=["cudnn", "prefix", "train"], choices=["cudnn", "prefix", "train"])
    return p.parse_args(argv)


def slake_folder(root, images, seed=0):
    """A SLAKE-layout folder: `images` random 448 x 448 images x 4 questions (answers known)."""
    rng, entries = np.random.default_rng(seed), []
    for img in range(images):
        (root / "imgs" / f"xmlab{img}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(root / "imgs" / f"xmlab{img}" /
                                                                                  "source.jpg")
        for question, answer, answer_type in QUESTIONS:
            entries.append({"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question,
                            "answer": answer, "q_lang": "en", "answer_type": answer_type, "qid": len(entries)})
    for split in ["train", "validate", "test"]:
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def random_model_folder(folder, records, device, layers, smoke):
    """A random-weight model saved as a hub folder: the 3B configuration (bf16), or with --smoke a tiny one."""
    if smoke:
        return tiny.build_random_tiny(folder, tiny.tokenizer_corpus(records), hidden=64, layers=2, heads=4,
                                      vision_hidden=32)
    model, tokenizer, image_processor = bench.build_random_qwen_3b(records, device, layers)
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


# ----------------------------------------------------------------------------------------------
# 1. cuDNN attention and a NaN-free bf16 backward


def masked_backward(model, tokens, device):
    """A bf16 forward + backward over `tokens` positions, a quarter of each row left-padded; finite gradients?"""
    model.zero_grad(set_to_none=True)
    ids = torch.randint(len(tiny.SPECIAL_TOKENS), 400, (2, tokens), device=device)  # no image or chat token
    mask = torch.ones_like(ids)
    mask[1, : tokens // 4] = 0  # left padding: the explicit mask of pytorch#196678
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {"loss": float(out.loss.detach()), "finite_gradients": all(bool(torch.isfinite(g).all()) for g in grads),
            "parameters_with_gradients": len(grads)}


def check_cudnn(model, args, device):
    modeling.disable_cudnn_attention()
    result = {"cudnn_sdp_enabled_after_switch": torch.backends.cuda.cudnn_sdp_enabled(), "tokens": args.tokens,
              "cudnn_off": masked_backward(model, args.tokens, device)}
    if device.type == "cuda":  # for the record: does the NaN show with cuDNN on, on this GPU and torch?
        torch.backends.cuda.enable_cudnn_sdp(True)
        result["cudnn_on"] = masked_backward(model, args.tokens, device)
        modeling.disable_cudnn_attention()
    model.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------------------------
# 2. The shared-prefix pass in bf16 with its 4-D mask


def check_prefix(model, tokenizer, image_processor, records, device):
    """bench.py --passes' measurement in bf16 (the model cast to it): shared vs unshared pass, forward + backward
    and no-grad time, bytes saved for backward, and their largest difference on the answer tokens."""
    prompt = rollout.build_inputs(tokenizer, image_processor, records, device=device)
    return bench.bench_passes(model.to(torch.bfloat16), tokenizer, prompt,
                              argparse.Namespace(max_new_tokens=16, seed=0, repeats=3), device)


# ----------------------------------------------------------------------------------------------
# 3. train.py's recipe, 2 steps, with and without --offload


def run_train(model_dir, data_root, out_dir, offload, smoke):
    """train.py under torchrun (one process), as a user runs it; (exit code, peak host RSS GiB, stdout tail)."""
    flags = ["--model", str(model_dir), "--dataset", "slake", "--data-root", str(data_root), "--out-dir",
             str(out_dir), "--max-steps", "2", "--questions-per-step", "4", "--group-size", "8", "--eval-every", "1",
             "--dtype", "bfloat16", "--gradient-checkpointing", "--eval-batch-size", "8", "--max-new-tokens", "16",
             *(["--offload"] if offload else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py", *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    log = done.stdout + done.stderr
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] \
        if (out_dir / "metrics.jsonl").is_file() else []
    steps = [r for r in rows if "eval" not in r]
    return {"exit_code": done.returncode, "steps": len(steps), "evaluations": len(rows) - len(steps),
            "gpu_peak_gib": max((r.get("gpu_peak_gib", 0.0) for r in steps), default=None),
            "host_peak_gib": max((r.get("host_peak_gib", 0.0) for r in steps), default=None),
            "kl_step1": steps[0]["kl"] if steps else None,
            "finite_grad_norms": all(math.isfinite(r["grad_norm"]) for r in steps) if steps else None,
            "plan": [line for line in log.splitlines() if "GiB" in line],  # memory.run_plan's start-up lines
            "log_tail": log[-4000:]}


def check_train(args, device, scratch, records):
    data_root = slake_folder(Path(scratch) / "slake", 2)
    results = {}
    for offload, layers in [(True, 0), (False, args.layers_without_offload)]:
        folder = Path(scratch) / f"model-{layers}"
        if not folder.exists():
            random_model_folder(folder, records, device, layers, args.smoke)
        name = "offload" if offload else f"no_offload_{layers or 'all'}_layers"
        results[name] = run_train(folder, data_root, Path(scratch) / f"run-{name}", offload, args.smoke)
        print(f"train {name}: exit {results[name]['exit_code']}, GPU peak {results[name]['gpu_peak_gib']} GiB, "
              f"host peak {results[name]['host_peak_gib']} GiB", flush=True)
    return results


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("experiments.gpu_check: no CUDA device here (use --smoke for the CPU code paths)")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "smoke": args.smoke}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="medevo-gpu-check-") as scratch:
        records = bench.generated_records(scratch, 8, 448, seed=0)
        if {"cudnn", "prefix"} & set(args.parts):
            folder = random_model_folder(Path(scratch) / "model-8", records, device, 8, args.smoke)
            model, tokenizer, image_processor = modeling.load(folder, device, dtype=torch.float32)
            for part, fn in [("cudnn", lambda: check_cudnn(model.train(), args, device)),
                             ("prefix", lambda: check_prefix(model.eval(), tokenizer, image_processor, records[:4],
                                                             device))]:
                if part in args.parts:
                    results[part] = attempt(fn)
                    print(f"{part}: {json.dumps(results[part])[:400]}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "train" in args.parts:
            results["train"] = attempt(lambda: check_train(args, device, scratch, records))
    results["seconds"] = time.time() - t_start
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return results


def attempt(fn):
    """fn()'s result, or the error it raised as a result: one part's failure must not hide the others'."""
    try:
        return fn()
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired, torch.OutOfMemoryError) as err:
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
