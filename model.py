"""The model: load any Qwen2.5-VL checkpoint, or build the offline tiny one.

Med-Evo adapts a medical multimodal LLM (the paper uses Qwen2.5-VL-3B/7B-Instruct) at test time.
`load()` is the one door every stage goes through: it returns (model, tokenizer, image_processor)
from a hub name or a local folder, via the plain `transformers` Auto classes, bf16 on GPU, fp32 on CPU.

Nothing here may download, so the project also ships an *offline default*: a real
`Qwen2_5_VLForConditionalGeneration` with a tiny config (a few layers, small hidden size, two vision
blocks, 112-px images), a byte-level BPE tokenizer trained locally with `tokenizers` that carries
Qwen's special tokens and chat format, and Qwen's own image processor class. It is saved with
`save_pretrained` and read back by the same `load()`, exactly like a hub model. A short supervised
warm start on the synthetic *source* domain (answers drawn from paraphrase sets, so that sampled
answers vary in form as a real model's do) turns the random model into a base model that is
competent but imperfect on the shifted *target* domain: the unlabeled test set Med-Evo adapts to.

    python model.py            # build (once) the tiny base model and report its scores
"""

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

REPO = Path(__file__).resolve().parent
TINY_BASE_DIR = REPO / "artifacts" / "tiny-base"  # the warm-started offline model (built once)
SYNTHETIC_DIR = REPO / "artifacts" / "synthetic"  # the synthetic benchmark (written once)

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


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_name(name_or_path):
    """A folder must hold config.json; anything else must look like a hub name (owner/name)."""
    path = Path(str(name_or_path)).expanduser()
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~")) or "/" not in str(name_or_path)
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_path}: not a model folder (no config.json in {path.resolve()}) "
                                "and not a hub name (owner/name)")


def load(name_or_path, device=None, dtype=None):
    """(model, tokenizer, image_processor) from a hub name or folder; bf16 on GPU, fp32 on CPU."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_model_name(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    image_processor = AutoImageProcessor.from_pretrained(str(name_or_path))
    return model, tokenizer, image_processor


# ----------------------------------------------------------------------------------------------
# The offline tiny model: tokenizer, config, random init


def train_tokenizer(corpus, vocab_size=512):
    """A byte-level BPE tokenizer (Qwen's kind) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    """A Qwen2.5-VL config scaled down to a few hundred thousand parameters."""
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


def qwen_generation_config(tokenizer):
    """Stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>: Qwen2.5-VL-Instruct's EOS setup."""
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def build_random_tiny(out_dir, corpus, seed=0, image_size=112, **sizes):
    """Write a random-weight tiny Qwen2.5-VL + tokenizer + image processor to out_dir, hub layout."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **sizes))
    model.generation_config = qwen_generation_config(tokenizer)
    # Images of about image_size x image_size: 56x56 .. image_size^2 pixels, in 28-px steps.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=image_size * image_size)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Warm start: a short supervised run on the synthetic *source* domain


def tokenizer_corpus(records):
    """Text the tiny tokenizer learns its merges from: prompts, paraphrased answers, chat words."""
    from data.synthetic import PARAPHRASES
    from rollout import DEFAULT_PROMPT_SUFFIX

    corpus = [r["question"] + DEFAULT_PROMPT_SUFFIX for r in records]
    corpus += [form for forms in PARAPHRASES.values() for form in forms]
    corpus += ["system", "user", "assistant", "You are a helpful assistant."]
    return corpus


def warm_start(model, tokenizer, image_processor, records, steps=2000, batch_size=16, lr=2e-3, seed=0, log_every=100):
    """Supervised fine-tuning on labelled source-domain records; answers drawn from paraphrase sets."""
    from data.synthetic import paraphrase
    from rollout import build_inputs, completion_logits_and_hidden

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = rng.sample(records, batch_size)
        answers = [paraphrase(r["answer"], rng) for r in batch]
        prompt = build_inputs(tokenizer, image_processor, batch, device=model.device)
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
        width = max(len(a) for a in answer_ids)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for i, a in enumerate(answer_ids):
            ids[i, : len(a)] = torch.tensor(a)
            mask[i, : len(a)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
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


def ensure_synthetic(root=SYNTHETIC_DIR, seed=0):
    """The synthetic benchmark folder, written once (deterministic from the seed)."""
    from data.synthetic import write_synthetic

    root = Path(root)
    if not (root / "test.json").is_file():
        print(f"writing the synthetic benchmark to {root} (seed {seed})", flush=True)
        write_synthetic(root, seed=seed)
    return root


def ensure_tiny_base(out_dir=TINY_BASE_DIR, data_root=SYNTHETIC_DIR, seed=0, steps=2000):
    """The offline tiny base model: random init + warm start on the source split, built once."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    import data

    data_root = ensure_synthetic(data_root, seed=seed)
    records = data.load_split("synthetic", data_root, "train")
    print(f"building the tiny base model in {out_dir} (warm start: {steps} steps on the source split)", flush=True)
    scratch = out_dir.with_name(out_dir.name + ".partial")
    build_random_tiny(scratch, tokenizer_corpus(records), seed=seed)
    model, tokenizer, image_processor = load(scratch, device="cpu")
    warm_start(model, tokenizer, image_processor, records, steps=steps, seed=seed)
    model.save_pretrained(scratch)
    scratch.rename(out_dir)  # atomic: a half-built model is never mistaken for a finished one
    return out_dir


def resolve_model(name):
    """`--model tiny` means the offline tiny base model (built on first use); anything else is passed on."""
    return ensure_tiny_base() if name == "tiny" else name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TINY_BASE_DIR), help="where the tiny base model is written")
    parser.add_argument("--data-root", default=str(SYNTHETIC_DIR), help="synthetic benchmark folder")
    parser.add_argument("--steps", type=int, default=2000, help="warm-start optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="answers sampled per question for majority@G")
    args = parser.parse_args()
    path = ensure_tiny_base(args.out, args.data_root, seed=args.seed, steps=args.steps)
    import evaluate

    evaluate.report_base_model(path, args.data_root, samples=args.samples, seed=args.seed)


if __name__ == "__main__":
    main()
