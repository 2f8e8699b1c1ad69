"""VQA-RAD loader: read VQA-RAD (Lau et al., Sci. Data 2018) into question records.

VQA-RAD is one of the three medical VQA benchmarks Med-Evo (arXiv 2603.07443)
evaluates on. It circulates in two layouts; we detect which one `root` holds:

  (a) the official OSF release
          <root>/VQA_RAD Dataset Public.json
          <root>/VQA_RAD Image Folder/synpic12345.jpg
      one list of questions (qid, image_name, question, answer, answer_type,
      phrase_type, ...). The test split is the 451 questions whose phrase_type is
      "test_freeform" or "test_para"; train is everything else.

  (b) the MEVF / PubMedCLIP / LLaVA-Med preprocessed folder
          <root>/data_RAD/trainset.json, testset.json     (or <root>/trainset.json, ...)
          <root>/data_RAD/images/synpic12345.jpg          (images/ beside the JSON files,
                                                           or <root>/images/)
      with the same per-question fields.

If both are present, (a) is used. VQA-RAD has only train and test splits and
only English questions. answer_type is stored with stray spaces/lowercase
("CLOSED ", "closed") and some answers as numbers; both are normalised.
"""

from pathlib import Path

from .slake import answer_as_text, count_text, normalize_answer_type, read_json_list, require_fields

SPLITS = ("train", "test")
OFFICIAL_JSON = "VQA_RAD Dataset Public.json"
OFFICIAL_IMAGES = "VQA_RAD Image Folder"
TEST_PHRASE_TYPES = ("test_freeform", "test_para")
PREPROCESSED_JSON = {"train": "trainset.json", "test": "testset.json"}
REQUIRED_FIELDS = ("image_name", "question", "answer", "answer_type", "qid")


def check_split_and_lang(split, lang):
    if split not in SPLITS:
        raise ValueError(f"vqa_rad: unknown split {split!r}, expected one of {SPLITS} "
                         "(VQA-RAD has no validation split)")
    if lang != "en":
        raise ValueError(f"vqa_rad: unknown lang {lang!r}, VQA-RAD is English only (lang='en')")


def to_record(entry, image_dir, path, index):
    require_fields(entry, REQUIRED_FIELDS, path, index)
    return {
        "image": str(image_dir / entry["image_name"]),
        "question": entry["question"],
        "answer": answer_as_text(entry["answer"], path, index),
        "answer_type": normalize_answer_type(entry["answer_type"], path, index),
        "qid": entry["qid"],
    }


def load_official(root, split):
    """Layout (a): one JSON, split by phrase_type."""
    path = root / OFFICIAL_JSON
    records, entries = [], read_json_list(path)
    for index, entry in enumerate(entries):
        require_fields(entry, ("phrase_type",), path, index)
        is_test = entry["phrase_type"] in TEST_PHRASE_TYPES
        if is_test == (split == "test"):
            records.append(to_record(entry, root / OFFICIAL_IMAGES, path, index))
    if not records:
        rule = "one of" if split == "test" else "none of"
        raise ValueError(f"vqa_rad: {path} has no {split} questions: the {split} split is the entries whose "
                         f"phrase_type is {rule} {TEST_PHRASE_TYPES}, and the file has phrase_types: "
                         f"{count_text(entry['phrase_type'] for entry in entries)}")
    return records, path


def find_preprocessed_json(root, split):
    """<root>/data_RAD/<file> or <root>/<file>, or None."""
    for folder in (root / "data_RAD", root):
        if (folder / PREPROCESSED_JSON[split]).is_file():
            return folder / PREPROCESSED_JSON[split]
    return None


def find_preprocessed_images(root, json_path):
    """images/ beside the JSON file, else <root>/images/."""
    for folder in (json_path.parent / "images", root / "images"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"vqa_rad: no image folder for {json_path}: "
                            f"looked for {json_path.parent / 'images'} and {root / 'images'}")


def load(root, split, lang="en"):
    """Records of one VQA-RAD split, and the annotation file they came from."""
    check_split_and_lang(split, lang)
    root = Path(root)
    if (root / OFFICIAL_JSON).is_file():
        return load_official(root, split)
    path = find_preprocessed_json(root, split)
    if path is None:
        raise FileNotFoundError(
            f"vqa_rad: no annotations under {root}: looked for {root / OFFICIAL_JSON} (official release), "
            f"{root / 'data_RAD' / PREPROCESSED_JSON[split]} and {root / PREPROCESSED_JSON[split]} (preprocessed)")
    image_dir = find_preprocessed_images(root, path)
    records = [to_record(entry, image_dir, path, index) for index, entry in enumerate(read_json_list(path))]
    return records, path
