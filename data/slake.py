"""SLAKE loader: read the official SLAKE 1.0 annotation files into question records.

SLAKE (Liu et al., ISBI 2021) is one of the three medical VQA benchmarks Med-Evo
(arXiv 2603.07443) evaluates on. Its official layout is

    <root>/imgs/xmlab102/source.jpg        (one folder per image)
    <root>/train.json  validate.json  test.json

where each JSON file is a list of questions such as

    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "...", "answer": "CT",
     "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN",
     "base_type": "vqa", "content_type": "Modality", "triple": [...], "qid": 11934}

About half of the questions are in Chinese (q_lang "zh"); the usual protocol (and
ours, lang="en") keeps the English ones: 1061 test questions, 645 OPEN / 416 CLOSED.
The synthetic benchmark (data/synthetic.py) is written in this same format.

The small JSON helpers here are shared with the VQA-RAD loader.
"""

import json
from collections import Counter
from pathlib import Path

SPLITS = ("train", "validate", "test")
SYNTHETIC_SPLITS = SPLITS + ("dev",)  # the synthetic benchmark (SLAKE format) adds a target-domain dev split
LANGS = ("en", "zh", "all")
REQUIRED_FIELDS = ("img_name", "question", "answer", "q_lang", "answer_type", "qid")


# -----------------------------------------------------------------------------
# helpers shared with data/vqa_rad.py

def read_json_list(path):
    """Parse a JSON file whose top level must be a list of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"annotation file {path} is empty (no JSON at all)")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"annotation file {path} must hold a JSON list, found {type(entries).__name__}")
    if not entries:
        raise ValueError(f"annotation file {path} is empty: its list holds no questions")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"annotation file {path}: entry {index} is a {type(entry).__name__}, expected an object")
    return entries


def count_text(values):
    """'zh 1033, en 2': how often each value occurs, most common first (for messages on empty splits)."""
    return ", ".join(f"{value} {n}" for value, n in Counter(str(v) for v in values).most_common())


def require_fields(entry, fields, path, index):
    """Raise if an annotation entry lacks one of the fields we read."""
    for field in fields:
        if field not in entry:
            raise ValueError(f"annotation file {path}: entry {index} has no field {field!r}")


def normalize_answer_type(value, path, index):
    """'OPEN' or 'CLOSED' from a raw answer_type (VQA-RAD has stray spaces and lowercase)."""
    answer_type = str(value).strip().upper()
    if answer_type not in ("OPEN", "CLOSED"):
        raise ValueError(f"annotation file {path}: entry {index} has answer_type {value!r}, "
                         "expected 'OPEN' or 'CLOSED'")
    return answer_type


def answer_as_text(value, path, index):
    """Answers are strings; a few datasets store numbers (e.g. VQA-RAD's 2), which become '2'.

    A null answer stays None: an unlabeled test set ships without answers.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"annotation file {path}: entry {index} has answer {value!r} "
                         f"of type {type(value).__name__}, expected a string or a number")
    return str(value)


# -----------------------------------------------------------------------------
# the loader

def check_split_and_lang(split, lang, splits=SPLITS):
    if split not in splits:
        raise ValueError(f"slake: unknown split {split!r}, expected one of {splits}")
    if lang not in LANGS:
        raise ValueError(f"slake: unknown lang {lang!r}, expected one of {LANGS}")


def load(root, split, lang="en", splits=SPLITS):
    """Records of one SLAKE split, and the annotation file they came from.

    Answers and questions are kept verbatim (SLAKE has e.g. 'Transverse  Plane' with
    two spaces); normalisation is the evaluator's job. A null answer (an unlabeled
    copy of the split) loads as None.
    """
    check_split_and_lang(split, lang, splits)
    root = Path(root)
    path = root / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"slake: annotation file {path} does not exist "
                                f"(expected the official layout <root>/{split}.json + <root>/imgs/)")
    records, entries = [], read_json_list(path)
    for index, entry in enumerate(entries):
        require_fields(entry, REQUIRED_FIELDS, path, index)
        if lang != "all" and entry["q_lang"] != lang:
            continue
        records.append({
            "image": str(root / "imgs" / entry["img_name"]),
            "question": entry["question"],
            "answer": answer_as_text(entry["answer"], path, index),
            "answer_type": normalize_answer_type(entry["answer_type"], path, index),
            "qid": entry["qid"],
        })
    check_some_in_lang(records, entries, lang, path)
    return records, path


def check_some_in_lang(records, entries, lang, path):
    """An empty split says why: which languages the file does have, and the --lang that reads them."""
    if records:
        return
    langs = [entry["q_lang"] for entry in entries]
    options = " or ".join(f"--lang {name}" for name in LANGS[::-1] if name == "all" or name in langs)
    raise ValueError(f"slake: {path} has no questions with q_lang {lang!r} "
                     f"(it has: {count_text(langs)}); use {options}")
