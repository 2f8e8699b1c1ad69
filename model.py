"""The model: the one door every stage goes through to a Qwen2.5-VL checkpoint.

Med-Evo adapts a medical multimodal LLM (the paper uses Qwen2.5-VL-3B/7B-Instruct) at test time.
`load()` returns (model, tokenizer, image_processor) from a hub name or a local folder, via the plain
`transformers` Auto classes, bf16 on GPU, fp32 on CPU. The offline tiny base model is built by models/tiny.py
and read back through this same door, exactly like a hub model. `empty_model()` builds the same class on
the meta device from a configuration (parallel.load_sharded: the ranks that do not read the weights).

Two settings every entry point (train.py, evaluate.py, bench.py) applies before any model runs:
  * `disable_cudnn_attention()`: on CUDA, SDPA's cuDNN backend is switched off. With an explicit
    attention mask (ours: left padding, padding after EOS) its backward gives NaN gradients on Hopper
    (H100 / H200) for some sequence lengths (pytorch#196678; trl#7181 traces it to Qwen2.5's
    massive-activation head), with torch 2.13. Flash / memory-efficient attention are unaffected.
  * `bound_pixels()`: an image's token count grows with its pixels (one token per 28 x 28 pixels), and
    the hub processor allows 12,845,056 pixels (~16k tokens) per image; every prompt is repeated G times
    in the teacher-forced pass. --max-pixels caps it (default 4,194,304 = 2048 x 2048, EasyR1's
    `data.max_pixels`); --min-pixels, when given, raises small images (EasyR1 uses 262,144; by default we
    keep the processor's own minimum, so that small images are not upscaled).
"""

import copy
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from data import hub

DEFAULT_MAX_PIXELS = 4194304  # EasyR1 (hiyouga/EasyR1, verl/trainer/config.py: DataConfig.max_pixels)
PIXEL_FACTOR = 28  # 14-pixel patches, merged 2 x 2: an image side is a multiple of 28, one token per 28 x 28


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def disable_cudnn_attention():
    """On CUDA, no cuDNN SDPA (NaN gradients with explicit masks on Hopper: the module docstring)."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


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
    return (load_model(name_or_path, device, dtype), *load_processors(name_or_path))


def load_model(name_or_path, device, dtype):
    """The model; a hub name that cannot be had is a one-line SystemExit (data.hub.model_errors)."""
    with hub.model_errors(name_or_path):
        model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), dtype=dtype)
    return model.to(device)


def load_processors(name_or_path):
    """(tokenizer, image_processor): small files, read by every rank. A hub name that cannot be had is a
    one-line SystemExit (data.hub.model_errors)."""
    with hub.model_errors(name_or_path):
        return AutoTokenizer.from_pretrained(str(name_or_path)), AutoImageProcessor.from_pretrained(str(name_or_path))


def empty_model(config, generation_config, dtype):
    """The model class of `config` on the meta device (no storage), in eval mode as from_pretrained gives it."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), dtype=dtype)
    model.generation_config = generation_config
    return model.eval()


def qwen_generation_config(tokenizer):
    """Stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>: Qwen2.5-VL-Instruct's EOS setup."""
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------
# Image size: --max-pixels / --min-pixels


def add_pixel_flags(parser):
    """--max-pixels / --min-pixels, the same for train.py, evaluate.py and bench.py."""
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest image, in pixels, after resizing: lowers the image processor's own cap (never "
                             f"raises it); default {DEFAULT_MAX_PIXELS} = 2048 x 2048 (EasyR1's)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="smallest image, in pixels, after resizing (default: the image processor's own; "
                             "EasyR1 uses 262144, which would upscale small images)")


def check_pixel_flags(max_pixels, min_pixels):
    """SystemExit naming the flag for a bound no image can meet."""
    if max_pixels < PIXEL_FACTOR**2:
        raise SystemExit(f"--max-pixels {max_pixels}: must be an integer >= {PIXEL_FACTOR**2} (one 28 x 28 token)")
    if min_pixels is not None and not 0 < min_pixels <= max_pixels:
        raise SystemExit(f"--min-pixels {min_pixels}: must be an integer in [1, --max-pixels {max_pixels}]")


def bound_pixels(image_processor, max_pixels, min_pixels=None):
    """Apply the flags to the processor: max_pixels lowers its cap (never raises it), min_pixels (if given)
    replaces its minimum. Returns (min_pixels, max_pixels) in force."""
    size = image_processor.size
    longest = min(max_pixels, size.longest_edge)
    shortest = size.shortest_edge if min_pixels is None else min_pixels
    if shortest > longest:
        raise SystemExit(f"--min-pixels {shortest}: above the cap in force ({longest} pixels)")
    size.longest_edge, size.shortest_edge = longest, shortest
    return shortest, longest


def apply_pixel_flags(image_processor, max_pixels, min_pixels, records):
    """bound_pixels, then the start-up line: the pixels in force and the records' image-token range."""
    low, high = bound_pixels(image_processor, max_pixels, min_pixels)
    few, many = image_token_range(image_processor, records)
    return (f"images: {low}-{high} pixels in force (--min-pixels / --max-pixels): {few}-{many} image tokens per image "
            f"of the split")


def image_tokens(image_processor, height, width):
    """Merged vision tokens the processor gives an image of height x width pixels."""
    size, factor = image_processor.size, image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge, max_pixels=size.longest_edge)
    return (h // factor) * (w // factor)


def image_token_range(image_processor, records):
    """(fewest, most) image tokens over the records' images (sizes read from the file headers)."""
    counts = []
    for record in records:
        image = record["image"]
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            with Image.open(image) as opened:
                width, height = opened.size
        counts.append(image_tokens(image_processor, height, width))
    return min(counts), max(counts)


def longest_prompt(tokenizer, image_processor, records, prompt_suffix):
    """(tokens, image tokens) bounding the split's longest prompt: the largest image's tokens plus the text
    tokens (chat template included) of the longest of the 32 longest questions by characters."""
    image = image_token_range(image_processor, records)[1]
    questions = sorted({r["question"] for r in records}, key=len)[-32:]
    text = 0
    for question in questions:
        content = [{"type": "image"}, {"type": "text", "text": question + prompt_suffix}]
        messages = [{"role": "user", "content": content}]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = max(text, len(tokenizer(chat, add_special_tokens=False)["input_ids"]) - 1)  # less the one image pad
    return text + image, image
