"""Shared fixtures: a tiny random Qwen2.5-VL saved and loaded like a hub model, and small images."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Nothing downloads in the tests, on a machine with a network too: huggingface_hub (read at its import, below) is
# offline with an empty cache. tests/test_hub.py serves its own fake Hub to child processes with their own env.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="medevo-empty-hub-cache-")

import model as modeling  # noqa: E402
from models import tiny as offline  # noqa: E402  (the fixture below is called `tiny`)

CORPUS = [
    "What modality is used to take this image? Answer the question using a single word or phrase.",
    "Is there a lesion in the left lung? Where is the liver? How many kidneys are in the image?",
    "CT MRI X-Ray yes no left lung right lung heart liver brain kidney 2 1 0",
    "system user assistant You are a helpful assistant.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight tiny Qwen2.5-VL written with save_pretrained (built once per test session)."""
    out = tmp_path_factory.mktemp("tiny-random")
    return offline.build_random_tiny(out, CORPUS, seed=0, hidden=64, layers=2, heads=4, vision_hidden=32, init_std=0.5)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer, image_processor) loaded back through model.load, as a hub model would be."""
    return modeling.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def image_records(tmp_path_factory):
    """Five records with images of different sizes and questions of different lengths."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(112, 112), (84, 112), (112, 56), (70, 90), (100, 100)]
    questions = ["What modality is used to take this image?", "Is there a lesion?",
                 "Where is the lesion in the left lung of this patient?", "How many kidneys?", "Is this a CT scan?"]
    records = []
    for i, ((h, w), q) in enumerate(zip(sizes, questions)):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        records.append({"image": str(path), "question": q, "answer": None, "answer_type": "OPEN", "qid": i})
    return records


SLAKE_QUESTIONS = [
    ("What modality is used to take this image?", "CT", "OPEN"),
    ("Is there a lesion?", "Yes", "CLOSED"),
    ("Where is the lesion?", "Left Lung", "OPEN"),
    ("Is this a CT scan?", "No", "CLOSED"),
]


@pytest.fixture(scope="session")
def slake_folder(tmp_path_factory):
    """A SLAKE-layout folder (imgs/xmlabN/source.jpg + test.json): 3 images x 4 English questions."""
    root = tmp_path_factory.mktemp("slake")
    rng = np.random.default_rng(1)
    entries, qid = [], 0
    for img_id in range(3):
        folder = root / "imgs" / f"xmlab{img_id}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(folder / "source.jpg")
        for question, answer, answer_type in SLAKE_QUESTIONS:
            entries.append({"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question,
                            "answer": answer, "q_lang": "en", "location": "Lung", "modality": "CT",
                            "answer_type": answer_type, "base_type": "vqa", "content_type": "Modality",
                            "triple": ["vhead", "_", "_"], "qid": qid})
            qid += 1
    for split in ["train", "validate", "test"]:
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="session")
def unlabeled_slake_folder(slake_folder, tmp_path_factory):
    """The same SLAKE-layout folder with every answer removed (null), as an unlabeled test set ships."""
    root = tmp_path_factory.mktemp("slake-unlabeled")
    shutil.copytree(slake_folder / "imgs", root / "imgs")
    for split in ["train", "validate", "test"]:
        entries = json.loads((slake_folder / f"{split}.json").read_text())
        (root / f"{split}.json").write_text(json.dumps([dict(e, answer=None) for e in entries]))
    return root
