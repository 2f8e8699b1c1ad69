"""Same behaviour, proved: 2 steps of every ablation row's flags (and of --gradient-checkpointing,
--updates-per-rollout 2 and --label-samples) on the shipped tiny base model, compared with golden files.

The golden files (tests/golden/*.json) were recorded at f7a42ed, the commit before the textbook redesign,
with `GOLDEN_RECORD=1 python -m pytest -q tests/test_same_behaviour.py`. Each holds, for one run:
  - metrics.jsonl, every field but the `seconds_*` timings;
  - the final predictions (predictions_final.jsonl);
  - the checkpoint's weights as a fingerprint per tensor: the float64 sum, the sum of squares and a dot
    product with a fixed random vector, plus the sha256 of the whole file's tensors.

On the machine that recorded them, before and after a refactor must agree to the last bit: `GOLDEN_EXACT=1`
compares every float with == and the weights' sha256, with the teacher-forced pass the goldens were recorded
with (one [prompt | answer] row per answer: rollout.SHARED_PREFIX_ATTENTION emptied). The shared-prefix pass
(issue 26) equals it to fp32 rounding only; the tolerance below covers it (largest deviation measured: see
docs/performance.md). Without it (CI, another CPU) floats compare within
RTOL / ATOL, and texts exactly: a float difference between CPUs could in principle flip a sampled token, but
two steps on 12 questions were measured to stay far inside the tolerance.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import rollout
import train

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = os.environ.get("GOLDEN_RECORD") == "1"
EXACT = os.environ.get("GOLDEN_EXACT") == "1"
RTOL, ATOL = 1e-3, 1e-5  # floats across CPUs and teacher-forced layouts (measured: 1.1e-5 at most)
WEIGHT_RTOL = 5e-3  # weights' fingerprints, relative to the tensor's norm (measured: 4.7e-4 at most; AdamW's
#                     normalised step turns a rounding-level gradient difference near 0 into up to lr per weight)
NEW_FIELDS = {"open_strict", "answer_words"}  # metrics added after the goldens (issue 27): not in them, not compared

TTRL, MEDEVO = ["--pseudo-label", "majority", "--reward", "exact"], ["--pseudo-label", "fpl", "--reward", "hsr"]
RUNS = {  # name -> train.py flags: ablate.py's rows (the noisy oracle at one accuracy: the others differ in p only)
    "ttrl": TTRL,
    "fpl-exact": ["--pseudo-label", "fpl", "--reward", "exact"],
    "majority-hsr": ["--pseudo-label", "majority", "--reward", "hsr"],
    "medevo": MEDEVO,
    "oracle": ["--pseudo-label", "fpl", "--reward", "oracle"],
    "ttrl-n8": [*TTRL, "--label-samples", "8"],
    "medevo-n8": [*MEDEVO, "--label-samples", "8"],
    "ttrl-restrain": [*TTRL, "--consensus-min", "0.5"],
    "medevo-restrain": [*MEDEVO, "--consensus-min", "0.5"],
    "ttrl-empo": [*TTRL, "--consensus-min", "0.25", "--low-consensus", "drop"],
    "ttrl-empo-drop-bites": [*TTRL, "--consensus-min", "0.5", "--low-consensus", "drop"],  # 0.25 never bites at G=4
    "ttrl-ema": [*TTRL, "--ema-teacher"],
    "medevo-ema": [*MEDEVO, "--ema-teacher"],
    "evol-rl": [*TTRL, "--novelty"],
    "medevo-novelty": [*MEDEVO, "--novelty"],
    "entropy": ["--pseudo-label", "majority", "--reward", "entropy"],
    "noisy-0.7": ["--pseudo-label", "fpl", "--reward", "noisy-oracle", "--label-accuracy", "0.7"],
    "medevo-checkpointing": [*MEDEVO, "--gradient-checkpointing"],
    "medevo-mu2": [*MEDEVO, "--updates-per-rollout", "2"],
    "ttrl-mu2": [*TTRL, "--updates-per-rollout", "2", "--clip-eps", "0.1"],
    "medevo-dr-grpo-token-mean": [*MEDEVO, "--adv-scale", "none", "--loss-agg", "token-mean"],
}
COMMON = ["--model", "tiny", "--dataset", "slake", "--questions-per-step", "4", "--group-size", "4",
          "--max-new-tokens", "6", "--max-steps", "2", "--lr", "1e-3", "--eval-batch-size", "12", "--seed", "3"]
QUESTIONS = [("What modality is used to take this image?", "CT", "OPEN"), ("Is there a lesion?", "Yes", "CLOSED"),
             ("Where is the lesion?", "Left Lung", "OPEN"), ("Is this a CT scan?", "No", "CLOSED")]


@pytest.fixture(scope="module")
def golden_slake(tmp_path_factory):
    """A SLAKE-layout folder of 3 images x 4 questions, made from a fixed seed (the same on every machine)."""
    root = tmp_path_factory.mktemp("golden-slake")
    rng = np.random.default_rng(7)
    entries = []
    for img_id in range(3):
        (root / "imgs" / f"xmlab{img_id}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
            root / "imgs" / f"xmlab{img_id}" / "source.jpg", quality=95)
        for question, answer, answer_type in QUESTIONS:
            entries.append({"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question,
                            "answer": answer, "q_lang": "en", "answer_type": answer_type, "qid": len(entries)})
    for split in ["train", "validate", "test"]:
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def fingerprint(path):
    """Per tensor: float64 sum, sum of squares, dot with a fixed random vector; and the sha256 of all bytes."""
    tensors = load_file(path)
    digest, prints = hashlib.sha256(), {}
    for name in sorted(tensors):
        t = tensors[name].double().flatten()
        digest.update(name.encode() + tensors[name].contiguous().numpy().tobytes())
        probe = np.random.default_rng(len(name)).standard_normal(t.numel())
        v = t.numpy()
        prints[name] = [float(v.sum()), float((v * v).sum()), float(v @ probe)]
    return {"sha256": digest.hexdigest(), "tensors": prints}


def outputs(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]
    preds = [json.loads(line) for line in (out_dir / "predictions_final.jsonl").read_text().splitlines()]
    return {"metrics": rows, "predictions": preds,
            "weights": fingerprint(out_dir / "checkpoint" / "model.safetensors")}


def same(a, b, where):
    """Equal structures; floats within the tolerance (== under GOLDEN_EXACT)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        if EXACT or math.isnan(a) or math.isinf(a):
            assert a == b or (math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != {b!r}"
        else:
            assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        a = {k: v for k, v in a.items() if k not in NEW_FIELDS or k in b}
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_weights(got, want, where):
    if EXACT:
        assert got["sha256"] == want["sha256"], f"{where}: the weights differ in some bit"
        return
    for name, prints in want["tensors"].items():
        scale = math.sqrt(prints[1]) + 1e-12  # the tensor's norm: differences are relative to it
        for g, w in zip(got["tensors"][name], prints):
            assert abs(g - w) <= WEIGHT_RTOL * scale + ATOL, f"{where}.{name}: {g} != {w}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_steps_match_the_golden_files(name, golden_slake, tmp_path, monkeypatch):
    if EXACT or RECORD:  # the goldens' own teacher-forced pass, so that a refactor can be checked bit for bit
        monkeypatch.setattr(rollout, "SHARED_PREFIX_ATTENTION", ())
    train.main([*COMMON, "--data-root", str(golden_slake), "--out-dir", str(tmp_path), *RUNS[name]])
    got = outputs(tmp_path)
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
        return
    want = json.loads(path.read_text())
    same(got["metrics"], want["metrics"], f"{name}: metrics")
    same(got["predictions"], want["predictions"], f"{name}: predictions")
    same_weights(got["weights"], want["weights"], f"{name}: weights")
