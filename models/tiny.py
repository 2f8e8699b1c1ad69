"""The offline tiny base model: a real Qwen2.5-VL, scaled down, warm-started on the synthetic source domain.

Med-Evo adapts a competent medical VLM (Qwen2.5-VL-3B/7B) to an unseen domain at test time. Nothing here
may download, so the project ships an offline stand-in with the same two premises, measured on the base
model alone before any adaptation runs:
  1. the model sees: on the source scanner's held-out `validate` split it answers well;
  2. the shift costs it: on the target scanner's `test` split its greedy answers are clearly worse.

The model is a `Qwen2_5_VLForConditionalGeneration` with a tiny config, a byte-level BPE tokenizer trained
locally with `tokenizers` (Qwen's special tokens and chat template) and Qwen's own image processor class,
saved with `save_pretrained` and read back by the same `model.load()` as a hub model. A supervised warm
start on the labelled source split (answers drawn from paraphrase sets, so that sampled answers vary in
form as a real model's do) turns the random model into the base model.

The build is deterministic on one machine, but across CPUs floating point differs and 4500 warm-start steps
amplify it into another model (docs/tiny_model.md). So the three base models of the frozen recipe (warm-start seeds
0, 1, 2) are shipped in models/tiny-base-seedS, with every file's SHA-256 in models/SHA256SUMS
(sha256sum's format). `--model tiny [--tiny-seed S]` (train.py) loads one after checking every hash: a
new clone starts from the very weights the documented numbers were measured on, in seconds. Building stays
the way to check them:

    python -m models.tiny                  # build seed 0 from scratch into artifacts/tiny-base, write its report.json
    python -m models.tiny --seed 1         # ... into artifacts/tiny-base-seed1 (--out DIR: elsewhere)
    python -m models.tiny --verify 0       # rebuild into artifacts/tiny-base-seed0.verify, compare with the shipped one
    python -m models.tiny --ship 1         # copy the finished build of seed 1 into models/, rewrite the manifest

report.json: {"source_validate": {"greedy": S}, "target_test": {"greedy": S, "majority": S, "fpl": S}, ...}
with S = {"overall", "open_recall", "closed_acc"} in percent; majority / FPL pick one of G = 8 answers
sampled at T = 1. `--verify` fails (exit 1) when a rebuilt score differs from the shipped one by more
than MAX_REPORT_DIFF points.
"""

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

import data
import evaluate
import model as modeling
from data.synthetic import IMAGE_SIZE, PARAPHRASES, paraphrase, write_synthetic
from rollout import DEFAULT_PROMPT_SUFFIX, build_inputs, completion_logits_and_hidden

# models/tiny-base-seed0: the shipped base model; artifacts/synthetic: the benchmark (seed 0, written on first
# use). Defined in evaluate.py, whose CLI defaults to them (evaluate sits below tiny in the import stack).
TINY_BASE_DIR, SYNTHETIC_DIR = evaluate.TINY_BASE_DIR, evaluate.SYNTHETIC_DIR
REPO = evaluate.ARTIFACTS.parent
SHIPPED_DIR = TINY_BASE_DIR.parent  # models/: tiny-base-seed{0,1,2} and the manifest
SHIPPED_SEEDS = (0, 1, 2)
MANIFEST_NAME = "SHA256SUMS"
BUILD_DIR = evaluate.ARTIFACTS / "tiny-base"  # where `python -m models.tiny` builds seed 0 (seed S: tiny-base-seedS)
MAX_REPORT_DIFF = 0.5  # points: `--verify` fails when a rebuilt report.json score differs by more

# The frozen recipe of the base model (chosen from base-model reports only; docs/tiny_model.md lists the attempts).
SIZES = dict(hidden=128, layers=4, heads=4, vision_hidden=128, vision_depth=2)
WARM_START = dict(steps=4500, batch_size=16, lr=2e-3)

# The premises (docs/tiny_model.md): the base model sees on the source domain, and the target shift costs it.
MIN_SOURCE_OVERALL, MIN_SOURCE_CLOSED, MIN_SHIFT_COST = 80.0, 75.0, 5.0

# Qwen2's special tokens, in Qwen's order, so the tiny model's prompts look like the real one's.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL's chat format (default system prompt; an image becomes <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Tokenizer, config, random init


def train_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE tokenizer (Qwen's kind) with Qwen's special tokens and chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, hidden=128, layers=4, heads=4, vision_hidden=128, vision_depth=2, init_std=0.02):
    """A Qwen2.5-VL config scaled down to about a million parameters."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    third = head_dim // 2 // 3  # mrope splits the head_dim/2 rotary frequencies over (t, h, w)
    mrope_section = [head_dim // 2 - 2 * third, third, third]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
            initializer_range=init_std,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=4,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
            initializer_range=init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        initializer_range=init_std,
    )


def build_random_tiny(out_dir, corpus, seed=0, image_size=IMAGE_SIZE, **sizes):
    """Write a random-weight tiny Qwen2.5-VL + tokenizer + image processor to out_dir, hub layout."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **sizes))
    model.generation_config = modeling.qwen_generation_config(tokenizer)
    # Images of about image_size x image_size: 56x56 .. image_size^2 pixels, in 28-px steps.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=image_size * image_size)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Warm start: supervised training on the synthetic *source* domain


def tokenizer_corpus(records):
    """Text the tiny tokenizer learns its merges from: prompts, paraphrased answers, chat words."""
    corpus = [r["question"] + DEFAULT_PROMPT_SUFFIX for r in records]
    corpus += [form for forms in PARAPHRASES.values() for form in forms]
    corpus += ["system", "user", "assistant", "You are a helpful assistant."]
    return corpus


def answer_batch(tokenizer, answers, device):
    """Answer token ids + EOS, right-padded: (ids [B, T], mask [B, T])."""
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
    width = max(len(a) for a in answer_ids)
    ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(answers), width, dtype=torch.long)
    for i, a in enumerate(answer_ids):
        ids[i, : len(a)] = torch.tensor(a)
        mask[i, : len(a)] = 1
    return ids.to(device), mask.to(device)


def warm_start(model, tokenizer, image_processor, records, steps=WARM_START["steps"],
               batch_size=WARM_START["batch_size"], lr=WARM_START["lr"], seed=0, log_every=250):
    """Supervised fine-tuning on labelled source-domain records; answers drawn from paraphrase sets."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = rng.sample(records, batch_size)
        prompt = build_inputs(tokenizer, image_processor, batch, device=model.device)
        ids, mask = answer_batch(tokenizer, [paraphrase(r["answer"], rng) for r in batch], model.device)
        logits, _ = completion_logits_and_hidden(model, prompt, ids, mask, group_size=1)
        loss = torch.nn.functional.cross_entropy(logits.float()[mask.bool()], ids[mask.bool()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"warm start step {step + 1}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Built once: the benchmark folder and the base model (from scratch; the shipped ones are below)


def ensure_synthetic(root=SYNTHETIC_DIR, seed=0):
    """The synthetic benchmark folder, written once (deterministic from the seed)."""
    root = Path(root)
    if not (root / "generator.json").is_file():
        print(f"writing the synthetic benchmark to {root} (seed {seed})", flush=True)
        write_synthetic(root, seed=seed)
    if not (root / "dev.json").is_file():
        raise SystemExit(f"{root} holds the previous synthetic benchmark (no dev split): delete it (and "
                         f"{BUILD_DIR.name}, warm-started on it) and run again to write the current one")
    return root


def build_dir(seed):
    """Where `python -m models.tiny --seed S` builds: artifacts/tiny-base for seed 0, artifacts/tiny-base-seedS else."""
    return BUILD_DIR if seed == 0 else BUILD_DIR.with_name(f"tiny-base-seed{seed}")


def repo_relative(path):
    """An absolute path inside the repository as a relative one (build.json then names no machine's folders)."""
    path = Path(path)
    return path.relative_to(REPO).as_posix() if path.is_absolute() and path.is_relative_to(REPO) else str(path)


def ensure_tiny_base(out_dir=BUILD_DIR, data_root=SYNTHETIC_DIR, seed=0, sizes=None, warm=None):
    """The offline tiny base model: random init + warm start on the source split, built once."""
    out_dir = Path(out_dir)
    sizes, warm = dict(SIZES, **(sizes or {})), dict(WARM_START, **(warm or {}))
    if (out_dir / "config.json").is_file():
        check_recipe(out_dir, seed, sizes, warm)
        return out_dir
    records = data.load_split("synthetic", ensure_synthetic(data_root), "train")
    print(f"building the tiny base model in {out_dir} (seed {seed}, {sizes}, warm start {warm})", flush=True)
    scratch = out_dir.with_name(out_dir.name + ".partial")
    t0 = time.time()
    build_random_tiny(scratch, tokenizer_corpus(records), seed=seed, **sizes)
    model, tokenizer, image_processor = modeling.load(scratch, device="cpu")
    warm_start(model, tokenizer, image_processor, records, seed=seed, **warm)
    model.save_pretrained(scratch)
    recipe = {"seed": seed, "sizes": sizes, "warm_start": warm, "data_root": repo_relative(Path(data_root).resolve()),
              "torch": torch.__version__, "build_seconds": round(time.time() - t0, 1)}
    (scratch / "build.json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
    scratch.rename(out_dir)  # atomic: a half-built model is never mistaken for a finished one
    return out_dir


# What to do about a base model of another recipe: a build is rebuilt; the shipped ones are rebuilt and shipped again.
REBUILD = "delete it and run again, or pass --out (tiny.py) to build elsewhere"
RESHIP = "tiny.py's recipe changed without a rebuild of the shipped models: python -m models.tiny --seed S, then --ship S"


def check_recipe(out_dir, seed, sizes, warm, remedy=REBUILD):
    """Refuse a base model built with another recipe (e.g. the 3000-step warm start of an older clone)."""
    path = Path(out_dir) / "build.json"
    if not path.is_file():
        raise SystemExit(f"{out_dir} is a base model of the previous recipe (no build.json): {remedy}")
    built = json.loads(path.read_text(encoding="utf-8"))
    if (built["seed"], built["sizes"], built["warm_start"]) != (seed, sizes, warm):
        raise SystemExit(f"{out_dir} was built with seed {built['seed']}, sizes {built['sizes']}, warm start "
                         f"{built['warm_start']}; the recipe asks seed {seed}, sizes {sizes}, warm start {warm}: "
                         f"{remedy}")


# ----------------------------------------------------------------------------------------------
# The shipped base models: models/tiny-base-seedS, every file's SHA-256 in models/SHA256SUMS


def shipped_dir(seed, root=SHIPPED_DIR):
    return Path(root) / f"tiny-base-seed{seed}"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(root=SHIPPED_DIR):
    """{file relative to root: SHA-256} from root/SHA256SUMS (sha256sum's format: `sha256sum -c` checks it)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: missing (the SHA-256 of the shipped base models); restore it from the repository")
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise SystemExit(f"{path} line {number}: {line!r} is not '<sha256>  <file>' (sha256sum's format)")
        entries[name] = digest
    return entries


def write_manifest(root=SHIPPED_DIR):
    """Rewrite root/SHA256SUMS from the files in root/tiny-base-seed*/."""
    root = Path(root)
    files = sorted(p for p in root.glob("tiny-base-seed*/*") if p.is_file())
    lines = [f"{sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / MANIFEST_NAME).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root / MANIFEST_NAME


def shipped_model(seed=0, root=SHIPPED_DIR):
    """The shipped base model of warm-start seed `seed`, every file checked against the manifest."""
    folder, manifest = shipped_dir(seed, root), Path(root) / MANIFEST_NAME
    entries = {name: digest for name, digest in read_manifest(root).items() if name.startswith(folder.name + "/")}
    if not entries:
        raise SystemExit(f"no shipped tiny base model of warm-start seed {seed} in {manifest} (shipped: seeds "
                         f"{', '.join(map(str, SHIPPED_SEEDS))}); build it with python -m models.tiny --seed {seed} and "
                         f"pass --model {build_dir(seed)}")
    for name, digest in sorted(entries.items()):
        path = Path(root) / name
        if not path.is_file():
            raise SystemExit(f"{path}: missing (listed in {manifest}); restore it from the repository")
        actual = sha256(path)
        if actual != digest:
            raise SystemExit(f"{path}: its SHA-256 {actual} is not the one in {manifest} ({digest}): the shipped "
                             f"file was changed; restore it from the repository")
    check_recipe(folder, seed, SIZES, WARM_START, remedy=RESHIP)
    return folder


def resolve_model(name, tiny_seed=None):
    """`--model tiny [--tiny-seed S]`: the shipped base model of seed S (default 0), hash-checked; else `name`."""
    if name != "tiny":
        if tiny_seed is not None:
            raise SystemExit(f"--tiny-seed {tiny_seed} picks a shipped tiny base model: it needs --model tiny, "
                             f"not --model {name}")
        return name
    return shipped_model(0 if tiny_seed is None else tiny_seed)


# ----------------------------------------------------------------------------------------------
# The base model's report: are the premises met?


def premises(report):
    """{premise: bool} for a report (see the module docstring)."""
    source, target = report["source_validate"]["greedy"], report["target_test"]["greedy"]
    return {f"source-validate overall >= {MIN_SOURCE_OVERALL:g}": source["overall"] >= MIN_SOURCE_OVERALL,
            f"source-validate closed accuracy >= {MIN_SOURCE_CLOSED:g}": source["closed_acc"] >= MIN_SOURCE_CLOSED,
            f"target-test greedy overall >= {MIN_SHIFT_COST:g} points below source validate":
                target["overall"] <= source["overall"] - MIN_SHIFT_COST}


def write_report(model_dir, data_root=SYNTHETIC_DIR, samples=8, seed=0, splits=("validate", "test")):
    """Score the base model (evaluate.report_base_model), check the premises, write model_dir/report.json."""
    report = evaluate.report_base_model(model_dir, data_root, samples=samples, seed=seed, splits=splits)
    report["premises"] = premises(report)
    path = Path(model_dir) / "report.json"
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    for name, met in report["premises"].items():
        print(f"premise {'met   ' if met else 'FAILED'} {name}")
    print(f"wrote {path}")
    return report


# ----------------------------------------------------------------------------------------------
# Shipping a build, and checking the shipped models against a rebuild


def ship(seed, build, root=SHIPPED_DIR):
    """Copy a finished build of `seed` (the frozen recipe, report.json, premises met) to root; rewrite the manifest."""
    build, dest = Path(build), shipped_dir(seed, root)
    check_recipe(build, seed, SIZES, WARM_START)
    report_path = build / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"{report_path}: missing; the build is unfinished (tiny.py writes report.json last)")
    if not all(premises(read_report(build)).values()):
        raise SystemExit(f"{report_path}: the base model fails the premises; it is not shipped")
    if dest.resolve() == build.resolve():
        raise SystemExit(f"--ship {seed}: {build} is the shipped folder itself; give the build with --out")
    if dest.exists():
        print(f"replacing {dest}")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in sorted(build.iterdir()):
        if not path.is_file():
            raise SystemExit(f"{path}: not a file; a build folder holds files only")
        shutil.copyfile(path, dest / path.name)  # a copy: the build stays where it is
    recipe = json.loads((dest / "build.json").read_text(encoding="utf-8"))
    recipe["data_root"] = repo_relative(recipe["data_root"])
    (dest / "build.json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
    print(f"shipped {build} as {dest}; wrote {write_manifest(root)}")
    return dest


def verify(seed, out_dir, data_root=SYNTHETIC_DIR, samples=8):
    """Rebuild shipped base model `seed` from scratch into out_dir, compare; the largest report difference."""
    shipped, out_dir = shipped_model(seed), Path(out_dir)
    if out_dir.exists():
        raise SystemExit(f"{out_dir} exists (an earlier --verify build?): delete it, or pass --out DIR to rebuild "
                         f"elsewhere")
    ensure_tiny_base(out_dir, data_root, seed=seed)
    write_report(out_dir, data_root, samples=samples, seed=seed)
    return compare_builds(shipped, out_dir)


def compare_builds(shipped, rebuilt):
    """Print how a rebuild differs from the shipped model (files, weights, report); the largest score difference."""
    shipped, rebuilt = Path(shipped), Path(rebuilt)
    for path in sorted(shipped.iterdir()):
        if path.name not in ("build.json", "report.json"):  # build.json holds the build time; report: below
            same = (rebuilt / path.name).is_file() and sha256(rebuilt / path.name) == sha256(path)
            print(f"{path.name}: {'byte-identical' if same else 'DIFFERS'}")
    weights = "model.safetensors"
    if sha256(shipped / weights) != sha256(rebuilt / weights):
        name, diff = largest_weight_difference(shipped / weights, rebuilt / weights)
        print(f"largest |weight difference|: {diff:.3g} ({name})")
    return compare_reports(read_report(shipped), read_report(rebuilt))


def read_report(folder):
    return json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))


def largest_weight_difference(a, b):
    """(tensor name, max |a - b|) over the tensors of two safetensors files."""
    wa, wb = load_file(a), load_file(b)
    if wa.keys() != wb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(wa.keys() ^ wb.keys())}")
    return max(((k, (wa[k].double() - wb[k].double()).abs().max().item()) for k in wa), key=lambda kv: kv[1])


def report_scores(report):
    """{"split.answers metric": percent} for every score of a report.json."""
    return {f"{split}.{kind} {metric}": value for split in ("source_validate", "target_test")
            for kind, scores in report[split].items() for metric, value in scores.items()}


def compare_reports(shipped, rebuilt):
    """Print both reports' scores side by side; return the largest |difference| in points."""
    a, b = report_scores(shipped), report_scores(rebuilt)
    if a.keys() != b.keys():
        raise SystemExit(f"the two report.json files hold different scores: {sorted(a.keys() ^ b.keys())}")
    print(f"{'report.json (percent)':<36} {'shipped':>8} {'rebuilt':>8} {'diff':>7}")
    for key in a:
        print(f"{key:<36} {a[key]:8.2f} {b[key]:8.2f} {b[key] - a[key]:+7.2f}")
    return max(abs(b[key] - a[key]) for key in a)


def run_verify(seed, out, data_root, samples):
    """`--verify S`: exit 1 when a rebuilt report.json score differs from the shipped one by > MAX_REPORT_DIFF."""
    worst = verify(seed, out or BUILD_DIR.with_name(f"tiny-base-seed{seed}.verify"), data_root, samples)
    if worst > MAX_REPORT_DIFF:
        raise SystemExit(f"--verify {seed}: the rebuild's report.json differs from {shipped_dir(seed)}'s by up to "
                         f"{worst:.2f} points (> {MAX_REPORT_DIFF})")
    print(f"--verify {seed}: the rebuild's report.json is within {worst:.2f} points of the shipped one")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--seed", type=int, default=0, help="build this warm-start seed (init, batches, paraphrases)")
    mode.add_argument("--verify", type=int, metavar="S", help="rebuild shipped base model S from scratch (into "
                      "artifacts/tiny-base-seedS.verify or --out) and compare it with models/tiny-base-seedS")
    mode.add_argument("--ship", type=int, metavar="S", help="copy the finished build of seed S (artifacts/..., or "
                      "--out) into models/tiny-base-seedS and rewrite models/SHA256SUMS")
    parser.add_argument("--out", default=None, help="the build folder (default: artifacts/tiny-base for seed 0, "
                                                    "artifacts/tiny-base-seedS for seed S)")
    parser.add_argument("--data-root", default=str(SYNTHETIC_DIR), help="synthetic benchmark folder (seed 0)")
    parser.add_argument("--steps", type=int, default=WARM_START["steps"], help="warm-start optimizer steps")
    parser.add_argument("--samples", type=int, default=8, help="answers sampled per question for majority / FPL")
    parser.add_argument("--vision-depth", type=int, default=SIZES["vision_depth"], help="vision blocks")
    args = parser.parse_args()
    frozen = (args.steps, args.vision_depth) == (WARM_START["steps"], SIZES["vision_depth"])
    if (args.verify is not None or args.ship is not None) and not frozen:
        parser.error("--verify and --ship use the frozen recipe: drop --steps / --vision-depth")
    if args.verify is not None:
        return run_verify(args.verify, args.out, args.data_root, args.samples)
    if args.ship is not None:
        return ship(args.ship, args.out or build_dir(args.ship))
    path = ensure_tiny_base(args.out or build_dir(args.seed), args.data_root, seed=args.seed,
                            sizes={"vision_depth": args.vision_depth}, warm={"steps": args.steps})
    write_report(path, args.data_root, samples=args.samples, seed=args.seed)


if __name__ == "__main__":
    main()
