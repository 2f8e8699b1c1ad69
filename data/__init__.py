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

Without --data-root, `resolve_root` looks in datasets/NAME; a missing datasets/slake is fetched from the
Hugging Face Hub (BoKelvin/SLAKE, through huggingface_hub: data/hub.py), the others are asked for.

A split that comes out empty (e.g. lang="en" on Chinese-only questions) is a ValueError saying why.
Images are read with `data.open_image` (data/images.py: 16-bit scans windowed to 8 bits), and
`data.check_images_open(records, source)` decodes every image of a split in seconds, before any
model loads, so a corrupt file is named (with its qid) up front.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import hub, path_vqa, slake, vqa_rad
from .images import open_image

DATASETS = ("slake", "vqa_rad", "path_vqa", "synthetic")


# Where `--dataset NAME` looks without --data-root, and what it expects to find there.
DATA_LAYOUTS = {
    "slake": "the official SLAKE release: imgs/xmlabN/source.jpg + train.json, validate.json, test.json",
    "vqa_rad": "the official VQA-RAD release ('VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/') "
               "or data_RAD/{trainset,testset}.json + images/",
    "path_vqa": "PathVQA: pvqa/qas/{split}/{split}_qa.pkl + pvqa/images/{split}/",
}


def resolve_root(name, data_root, default_parent, synthetic_dir):
    """The dataset folder: --data-root if given (it must exist), else default_parent/NAME (synthetic:
    synthetic_dir, written on first use; slake: fetched from the Hub when missing, data/hub.py). A missing
    folder is a SystemExit that names the flag."""
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise SystemExit(f"--data-root {root}: no such folder" + (
                " (the synthetic benchmark is written only to its default folder, artifacts/synthetic, or by "
                f"python -m data.synthetic --out {root})" if name == "synthetic" else ""))
        return root
    if name == "synthetic":
        return Path(synthetic_dir)
    root = Path(default_parent) / name
    if not root.is_dir() and name == "slake":
        return hub.fetch_slake(root)
    if not root.is_dir():
        raise SystemExit(f"--dataset {name}: no --data-root given and the default folder {root} does not "
                         f"exist; put {DATA_LAYOUTS[name]} there, or pass --data-root PATH")
    return root


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


def image_error(path):
    """None if `open_image` reads the file, else its error message (which names the file)."""
    try:
        open_image(path)
    except ValueError as err:
        return str(err)
    return None


def check_images_open(records, source=None):
    """Fully decode every distinct image of a split once, through `open_image` (the reader rollout uses).

    Run it before any model loads: a corrupt, truncated or unreadable file is then found in seconds
    (threads: PIL decodes outside the GIL) rather than at the first evaluation. Raises one ValueError
    listing every bad file with the qid of its first question; returns the number of images checked.
    """
    first_qid = {}
    for record in records:
        first_qid.setdefault(record["image"], record["qid"])
    with ThreadPoolExecutor() as pool:
        errors = list(pool.map(image_error, first_qid))
    bad = [(qid, error) for qid, error in zip(first_qid.values(), errors) if error is not None]
    if bad:
        where = f" (listed in {source})" if source is not None else ""
        lines = "\n".join(f"  qid {qid!r}: {error}" for qid, error in bad)
        raise ValueError(f"{len(bad)} of {len(first_qid)} images cannot be read{where}:\n{lines}")
    return len(first_qid)


def summary_line(name, split, records, source):
    counts = Counter(record["answer_type"] for record in records)
    return (f"{name}/{split}: {len(records)} questions "
            f"({counts['OPEN']} OPEN, {counts['CLOSED']} CLOSED) from {source}")


def read_records(name, root, split, lang):
    """(records, annotation file) from the dataset's own loader; synthetic is in SLAKE's format."""
    if name in ("slake", "synthetic"):
        return slake.load(root, split, lang, slake.SYNTHETIC_SPLITS if name == "synthetic" else slake.SPLITS)
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
    if not records:  # each loader says why first; this is the net under them
        raise ValueError(f"{name}/{split}: {source} gives no questions")
    check_unique_qids(records, source)
    check_images_exist(records, source)
    print(summary_line(name, split, records, source))
    return records
