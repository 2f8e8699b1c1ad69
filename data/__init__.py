"""Data: load a medical VQA split as a list of question records.

Med-Evo (arXiv 2603.07443) adapts a vision-language model on the *unlabeled* test
split of a medical VQA benchmark (SLAKE, VQA-RAD, PathVQA). Every stage of this
repository reads questions through one entry point,

    records = data.load_split(name, root, split, lang="en")

with name in {"slake", "vqa_rad", "path_vqa", "synthetic"} and split in
{"train", "validate", "test"} as each dataset supports. Each record is a dict with
exactly these keys:

    image        str, path of the image file (checked to exist at load time, so a
                 long run never dies half-way on a missing file)
    question     str
    answer       str or None (ground truth; numbers in the source become strings)
    answer_type  "OPEN" or "CLOSED"
    qid          str or int, unique within the split

"synthetic" is a small benchmark in SLAKE's on-disk format written by
`python -m data.synthetic --out ROOT` (see data/synthetic.py); it is read by the
SLAKE loader. Loading prints one summary line, e.g.

    slake/test: 1061 questions (645 OPEN, 416 CLOSED) from /data/slake/test.json
"""

from collections import Counter
from pathlib import Path

from . import path_vqa, slake, vqa_rad

DATASETS = ("slake", "vqa_rad", "path_vqa", "synthetic")


def check_root(name, root):
    if root.is_dir():
        return
    if name == "synthetic":
        raise FileNotFoundError(f"synthetic: benchmark folder {root} does not exist; "
                                f"write it first with: python -m data.synthetic --out {root}")
    raise FileNotFoundError(f"{name}: dataset root {root} does not exist or is not a directory")


def check_unique_qids(records, source):
    seen = set()
    for record in records:
        if record["qid"] in seen:
            raise ValueError(f"{source}: qid {record['qid']!r} occurs more than once in the split")
        seen.add(record["qid"])


def check_images_exist(records, source):
    """Every referenced image must be a file (each distinct path is checked once)."""
    checked = set()
    for record in records:
        image = record["image"]
        if image in checked:
            continue
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {image} (qid {record['qid']!r}, listed in {source}) does not exist")
        checked.add(image)


def summary_line(name, split, records, source):
    counts = Counter(record["answer_type"] for record in records)
    return (f"{name}/{split}: {len(records)} questions "
            f"({counts['OPEN']} OPEN, {counts['CLOSED']} CLOSED) from {source}")


def read_records(name, root, split, lang):
    """(records, annotation file) from the dataset's own loader; synthetic is in SLAKE's format."""
    if name in ("slake", "synthetic"):
        return slake.load(root, split, lang)
    if name == "vqa_rad":
        return vqa_rad.load(root, split, lang)
    return path_vqa.load(root, split, lang)


def load_split(name, root, split, lang="en"):
    """The question records of one split of a dataset (see the module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}, expected one of {DATASETS}")
    root = Path(root)
    check_root(name, root)
    records, source = read_records(name, root, split, lang)
    check_unique_qids(records, source)
    check_images_exist(records, source)
    print(summary_line(name, split, records, source))
    return records
