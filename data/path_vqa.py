"""PathVQA loader: read PathVQA (He et al., 2020) into question records.

PathVQA is one of the three medical VQA benchmarks Med-Evo (arXiv 2603.07443)
evaluates on. The official release ships the questions as pickles:

    <root>/pvqa/qas/train/train_qa.pkl      (also val/val_qa.pkl, test/test_qa.pkl)
    <root>/pvqa/images/train/train_0422.jpg

Each pickle is a list of dicts {"image": "train_0422", "question": ..., "answer": ...}.
`root` may also be the pvqa/ folder itself. Our split "validate" is PathVQA's "val".
PathVQA has no answer_type field: a question is CLOSED when its answer is yes/no,
OPEN otherwise (the convention of LLaVA-Med and the PathVQA paper). There is no
question id either: qid is the question's index in the pickle.

Trust assumption: pickle can run arbitrary code while loading. We only unpickle
the official qa files, and with an unpickler that refuses every global (class or
function reference), so only plain lists/dicts/strings/numbers load; a pickle
that needs anything else is rejected with an error naming the file.
"""

import pickle
from pathlib import Path

SPLITS = {"train": "train", "validate": "val", "test": "test"}  # ours -> PathVQA's folder names
REQUIRED_FIELDS = ("image", "question", "answer")


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for pure data: any global lookup is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only plain data is allowed)")


def read_qa_pickle(path):
    """The list of question dicts in a PathVQA *_qa.pkl file."""
    if not path.is_file():
        raise FileNotFoundError(f"path_vqa: question file {path} does not exist")
    with open(path, "rb") as f:
        try:
            entries = PlainDataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"path_vqa: cannot read {path} as a plain-data pickle: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"path_vqa: {path} must hold a list, found {type(entries).__name__}")
    if not entries:
        raise ValueError(f"path_vqa: {path} is empty: its list holds no questions")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"path_vqa: {path}: entry {index} is a {type(entry).__name__}, expected a dict")
        for field in REQUIRED_FIELDS:
            if field not in entry:
                raise ValueError(f"path_vqa: {path}: entry {index} has no field {field!r}")
    return entries


def pvqa_folder(root):
    """<root>/pvqa, or root itself when it is the pvqa folder."""
    if (root / "pvqa").is_dir():
        return root / "pvqa"
    if (root / "qas").is_dir():
        return root
    raise FileNotFoundError(f"path_vqa: no PathVQA data under {root}: expected {root / 'pvqa' / 'qas'}")


def image_file_name(image):
    """'train_0422' -> 'train_0422.jpg' (a name that already ends in .jpg is kept)."""
    return image if image.endswith(".jpg") else image + ".jpg"


def answer_type_of(answer):
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def load(root, split, lang="en"):
    """Records of one PathVQA split, and the pickle they came from."""
    if split not in SPLITS:
        raise ValueError(f"path_vqa: unknown split {split!r}, expected one of {tuple(SPLITS)}")
    if lang != "en":
        raise ValueError(f"path_vqa: unknown lang {lang!r}, PathVQA is English only (lang='en')")
    folder = pvqa_folder(Path(root))
    name = SPLITS[split]
    path = folder / "qas" / name / f"{name}_qa.pkl"
    image_dir = folder / "images" / name
    records = []
    for index, entry in enumerate(read_qa_pickle(path)):
        if entry["answer"] is None:
            raise ValueError(f"path_vqa: {path}: entry {index} has no answer, so OPEN/CLOSED cannot be told")
        answer = str(entry["answer"])
        records.append({
            "image": str(image_dir / image_file_name(str(entry["image"]))),
            "question": str(entry["question"]),
            "answer": answer,
            "answer_type": answer_type_of(answer),
            "qid": index,
        })
    return records, path
