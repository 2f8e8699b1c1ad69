"""The model: the one door every stage goes through to a Qwen2.5-VL checkpoint.

Med-Evo adapts a medical multimodal LLM (the paper uses Qwen2.5-VL-3B/7B-Instruct) at test time.
`load()` returns (model, tokenizer, image_processor) from a hub name or a local folder, via the plain
`transformers` Auto classes, bf16 on GPU, fp32 on CPU. The offline tiny base model is built by tiny.py
and read back through this same door, exactly like a hub model.
"""

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig


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


def qwen_generation_config(tokenizer):
    """Stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>: Qwen2.5-VL-Instruct's EOS setup."""
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
