"""Tests for data/: the four loaders on tiny fixtures in their real layouts, the real SLAKE
annotation counts, error messages that name the culprit, and the synthetic benchmark
(deterministic, SLAKE-readable, answers fixed by the pixels, a real domain shift,
paraphrases that keep the answer's words)."""

import json
import pickle
import random
import re
import string
import subprocess
import sys
import time
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from data import synthetic  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RECORD_KEYS = {"image", "question", "answer", "answer_type", "qid"}
SLAKE_FIELDS = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
                "base_type", "content_type", "triple", "qid"}


def placeholder_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (128, 128, 128)).save(path)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def slake_entry(qid, img_id, question, answer, answer_type, lang="en"):
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake_root(tmp_path):
    """A two-image SLAKE folder in the official layout."""
    root = tmp_path / "slake"
    write_json(root / "test.json", [
        slake_entry(10, 1, "What modality is used to take this image?", "CT", "OPEN"),
        slake_entry(11, 1, "这张图片的成像方式是什么?", "CT", "OPEN", lang="zh"),
        slake_entry(12, 2, "Is the lung healthy?", "No", "CLOSED"),
    ])
    placeholder_image(root / "imgs" / "xmlab1" / "source.jpg")
    placeholder_image(root / "imgs" / "xmlab2" / "source.jpg")
    return root


# -----------------------------------------------------------------------------
# SLAKE

def test_slake_loader_reads_official_layout(slake_root, capsys):
    records = data.load_split("slake", slake_root, "test")
    assert records == [
        {"image": str(slake_root / "imgs/xmlab1/source.jpg"), "question": "What modality is used to take this image?",
         "answer": "CT", "answer_type": "OPEN", "qid": 10},
        {"image": str(slake_root / "imgs/xmlab2/source.jpg"), "question": "Is the lung healthy?",
         "answer": "No", "answer_type": "CLOSED", "qid": 12},
    ]
    assert capsys.readouterr().out == f"slake/test: 2 questions (1 OPEN, 1 CLOSED) from {slake_root / 'test.json'}\n"
    assert [r["qid"] for r in data.load_split("slake", slake_root, "test", lang="all")] == [10, 11, 12]
    assert [r["qid"] for r in data.load_split("slake", slake_root, "test", lang="zh")] == [11]


def test_slake_unlabeled_copy_loads_answers_as_none(slake_root):
    path = slake_root / "test.json"
    write_json(path, [dict(e, answer=None) for e in json.loads(path.read_text(encoding="utf-8"))])
    records = data.load_split("slake", slake_root, "test")
    assert [(r["answer"], r["answer_type"]) for r in records] == [(None, "OPEN"), (None, "CLOSED")]


def test_slake_real_test_split_counts(tmp_path, capsys):
    source = SHARED / "data" / "slake" / "test.json"
    if not source.is_file():
        pytest.skip(f"{source} not available (../shared is absent)")
    root = tmp_path / "slake"
    root.mkdir()
    (root / "test.json").write_bytes(source.read_bytes())
    entries = json.loads(source.read_text(encoding="utf-8"))
    for img_name in {e["img_name"] for e in entries}:
        placeholder_image(root / "imgs" / img_name)

    english = data.load_split("slake", root, "test")
    assert len(english) == 1061
    assert Counter(r["answer_type"] for r in english) == {"OPEN": 645, "CLOSED": 416}
    assert capsys.readouterr().out == f"slake/test: 1061 questions (645 OPEN, 416 CLOSED) from {root / 'test.json'}\n"
    assert all(set(r) == RECORD_KEYS and isinstance(r["answer"], str) for r in english)
    assert len(data.load_split("slake", root, "test", lang="all")) == 2094
    assert set(entries[0]) == SLAKE_FIELDS  # the synthetic benchmark copies exactly these fields


def test_the_hub_fetch_manifest_is_the_real_release(tmp_path):
    """data/hub.py checks a fetched SLAKE against SLAKE_1_0: the real annotation files (and an empty file for
    each image they name) must pass, and a split with a question less must not."""
    if not (SHARED / "data" / "slake" / "test.json").is_file():
        pytest.skip("../shared/data/slake not available (../shared is absent)")
    root = tmp_path / "slake"
    for split in ("train", "validate", "test"):
        entries = json.loads((SHARED / "data" / "slake" / f"{split}.json").read_text(encoding="utf-8"))
        write_json(root / f"{split}.json", entries)
        for img_name in {entry["img_name"] for entry in entries}:
            (root / "imgs" / img_name).parent.mkdir(parents=True, exist_ok=True)
            (root / "imgs" / img_name).touch()
    assert data.hub.differences(root, data.hub.SLAKE_1_0) == []
    assert len(list(root.glob("imgs/*/source.jpg"))) == data.hub.SLAKE_1_0.images == 642
    first_english = next(i for i, e in enumerate(entries) if e["q_lang"] == "en")  # entries: test's
    write_json(root / "test.json", entries[:first_english] + entries[first_english + 1:])
    assert data.hub.differences(root, data.hub.SLAKE_1_0) == [
        "test: 2093 questions, the release has 2094", "test: 1060 English questions, the release has 1061"]


# -----------------------------------------------------------------------------
# errors name what is at fault

def test_error_unknown_dataset_split_lang(slake_root):
    with pytest.raises(ValueError, match="'slak'"):
        data.load_split("slak", slake_root, "test")
    with pytest.raises(ValueError, match="'val'"):
        data.load_split("slake", slake_root, "val")
    with pytest.raises(ValueError, match="'fr'"):
        data.load_split("slake", slake_root, "test", lang="fr")
    with pytest.raises(ValueError, match="'validate'"):
        data.load_split("vqa_rad", slake_root, "validate")
    with pytest.raises(ValueError, match="'zh'"):
        data.load_split("path_vqa", slake_root, "test", lang="zh")


def test_error_missing_root_and_split_file(tmp_path, slake_root):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        data.load_split("slake", missing, "test")
    with pytest.raises(FileNotFoundError, match=re.escape(str(slake_root / "train.json"))):
        data.load_split("slake", slake_root, "train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"python -m data.synthetic --out {missing}")):
        data.load_split("synthetic", missing, "test")


def test_error_missing_image(slake_root):
    (slake_root / "imgs" / "xmlab2" / "source.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(slake_root / "imgs/xmlab2/source.jpg"))):
        data.load_split("slake", slake_root, "test")


def test_error_malformed_json_missing_field_duplicate_qid(slake_root):
    path = slake_root / "test.json"
    path.write_text('[{"img_id": 1, ', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON")):
        data.load_split("slake", slake_root, "test")
    entry = slake_entry(10, 1, "Q?", "CT", "OPEN")
    del entry["answer"]
    write_json(path, [entry])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'answer'"):
        data.load_split("slake", slake_root, "test")
    write_json(path, [slake_entry(10, 1, "Q?", "CT", "OPEN"), slake_entry(10, 2, "Q2?", "No", "CLOSED")])
    with pytest.raises(ValueError, match="qid 10"):
        data.load_split("slake", slake_root, "test")
    write_json(path, [slake_entry(10, 1, "Q?", "CT", "MAYBE")])
    with pytest.raises(ValueError, match="'MAYBE'"):
        data.load_split("slake", slake_root, "test")


# -----------------------------------------------------------------------------
# VQA-RAD

def vqa_rad_entry(qid, answer, answer_type, phrase_type):
    return {"qid": qid, "image_name": f"synpic{qid % 2}.jpg", "image_organ": "CHEST", "question": f"question {qid}?",
            "answer": answer, "answer_type": answer_type, "question_type": "PRES", "phrase_type": phrase_type}


VQA_RAD_ENTRIES = [
    vqa_rad_entry(1, "No", "CLOSED", "freeform"),
    vqa_rad_entry(2, 2, "OPEN ", "para"),  # answer stored as a number, answer_type with a stray space
    vqa_rad_entry(3, "yes", "closed", "test_freeform"),
    vqa_rad_entry(4, "left lung", "OPEN", "test_para"),
    vqa_rad_entry(5, "Yes", "CLOSED", "frame"),
]


def test_vqa_rad_official_layout(tmp_path):
    root = tmp_path / "vqa_rad"
    write_json(root / "VQA_RAD Dataset Public.json", VQA_RAD_ENTRIES)
    for name in ("synpic0.jpg", "synpic1.jpg"):
        placeholder_image(root / "VQA_RAD Image Folder" / name)
    train = data.load_split("vqa_rad", root, "train")
    test = data.load_split("vqa_rad", root, "test")
    assert [(r["qid"], r["answer"], r["answer_type"]) for r in train] == [(1, "No", "CLOSED"), (2, "2", "OPEN"),
                                                                         (5, "Yes", "CLOSED")]
    assert [(r["qid"], r["answer"], r["answer_type"]) for r in test] == [(3, "yes", "CLOSED"),
                                                                        (4, "left lung", "OPEN")]
    assert test[0]["image"] == str(root / "VQA_RAD Image Folder" / "synpic1.jpg")
    assert all(set(r) == RECORD_KEYS for r in train + test)


@pytest.mark.parametrize("json_dir, image_dir", [("data_RAD", "data_RAD/images"), (".", "images")])
def test_vqa_rad_preprocessed_layout(tmp_path, json_dir, image_dir):
    root = tmp_path / "vqa_rad"
    write_json(root / json_dir / "trainset.json", VQA_RAD_ENTRIES[:2])
    write_json(root / json_dir / "testset.json", VQA_RAD_ENTRIES[2:4])
    for name in ("synpic0.jpg", "synpic1.jpg"):
        placeholder_image(root / image_dir / name)
    test = data.load_split("vqa_rad", root, "test")
    assert [(r["qid"], r["answer_type"]) for r in test] == [(3, "CLOSED"), (4, "OPEN")]
    assert test[1]["image"] == str(root / image_dir / "synpic0.jpg")
    assert [r["answer"] for r in data.load_split("vqa_rad", root, "train")] == ["No", "2"]


def test_vqa_rad_errors_name_the_file(tmp_path):
    root = tmp_path / "vqa_rad"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "data_RAD" / "testset.json"))):
        data.load_split("vqa_rad", root, "test")
    path = root / "VQA_RAD Dataset Public.json"
    write_json(path, [vqa_rad_entry(1, "No", "YESNO", "test_freeform")])
    placeholder_image(root / "VQA_RAD Image Folder" / "synpic1.jpg")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'YESNO'"):
        data.load_split("vqa_rad", root, "test")


# -----------------------------------------------------------------------------
# PathVQA

def test_path_vqa_official_layout(tmp_path):
    root = tmp_path / "pathvqa"
    entries = [{"image": "val_0001", "question": "Is this tissue necrotic?", "answer": "yes"},
               {"image": "val_0002", "question": "What have lost their nuclei?", "answer": "neutrophils"},
               {"image": "val_0001", "question": "Is there inflammation?", "answer": "No"}]
    path = root / "pvqa" / "qas" / "val" / "val_qa.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(entries))
    for name in ("val_0001.jpg", "val_0002.jpg"):
        placeholder_image(root / "pvqa" / "images" / "val" / name)
    records = data.load_split("path_vqa", root, "validate")
    assert records == [
        {"image": str(root / "pvqa/images/val/val_0001.jpg"), "question": "Is this tissue necrotic?", "answer": "yes",
         "answer_type": "CLOSED", "qid": 0},
        {"image": str(root / "pvqa/images/val/val_0002.jpg"), "question": "What have lost their nuclei?",
         "answer": "neutrophils", "answer_type": "OPEN", "qid": 1},
        {"image": str(root / "pvqa/images/val/val_0001.jpg"), "question": "Is there inflammation?", "answer": "No",
         "answer_type": "CLOSED", "qid": 2},
    ]
    assert data.load_split("path_vqa", root / "pvqa", "validate") == records  # root may be pvqa/ itself
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "pvqa/qas/test/test_qa.pkl"))):
        data.load_split("path_vqa", root, "test")


def test_path_vqa_refuses_pickles_with_globals(tmp_path):
    path = tmp_path / "pvqa" / "qas" / "test" / "test_qa.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps([OrderedDict(image="test_0001", question="q?", answer="yes")]))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*collections.OrderedDict"):
        data.load_split("path_vqa", tmp_path, "test")


# -----------------------------------------------------------------------------
# synthetic benchmark

SMALL = dict(n_source_images=24, n_validate_images=4, n_target_images=16, n_dev_images=4, image_size=112)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("synthetic") / "bench", seed=0, **SMALL)


def folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(synthetic_root, tmp_path):
    again = synthetic.write_synthetic(tmp_path / "again", seed=0, **SMALL)
    other = synthetic.write_synthetic(tmp_path / "other", seed=1, **SMALL)
    reference = folder_bytes(synthetic_root)
    assert len(reference) == 4 + 1 + 2 * 48  # 4 splits + generator.json + (jpg, detection.json) per image
    assert folder_bytes(again) == reference
    different = folder_bytes(other)
    assert different.keys() == reference.keys()
    assert different["test.json"] != reference["test.json"]
    assert sum(different[k] != reference[k] for k in reference if k.endswith(".jpg")) >= 40


def test_synthetic_is_read_by_the_slake_loader(synthetic_root, capsys):
    entries = {split: json.loads((synthetic_root / f"{split}.json").read_text())
               for split in ("train", "validate", "test")}
    for split, split_entries in entries.items():
        records = data.load_split("synthetic", synthetic_root, split)
        assert len(records) == len(split_entries) >= 7 * len({e["img_id"] for e in split_entries})
        assert all(set(e) == SLAKE_FIELDS and e["q_lang"] == "en" and e["img_name"].endswith("/source.jpg")
                   for e in split_entries)
    assert capsys.readouterr().out.startswith("synthetic/train: ")
    all_entries = [e for split_entries in entries.values() for e in split_entries]
    assert len({e["qid"] for e in all_entries}) == len(all_entries)  # qids are global, as in SLAKE
    images = {split: {e["img_id"] for e in split_entries} for split, split_entries in entries.items()}
    assert images["train"].isdisjoint(images["test"]) and images["validate"].isdisjoint(images["test"])
    with Image.open(synthetic_root / f"imgs/xmlab{min(images['test'])}/source.jpg") as img:
        assert img.size == (112, 112) and img.format == "JPEG"


def test_synthetic_question_mix(synthetic_root):
    entries = [e for split in ("train", "validate", "test")
               for e in json.loads((synthetic_root / f"{split}.json").read_text())]
    closed = [e for e in entries if e["answer_type"] == "CLOSED"]
    assert 0.4 <= len(closed) / len(entries) <= 0.6
    assert {e["answer"] for e in closed} == {"yes", "no"}
    assert 0.35 <= sum(e["answer"] == "yes" for e in closed) / len(closed) <= 0.65
    assert {e["answer"] for e in entries} <= set(synthetic.PARAPHRASES)
    assert {e["modality"] for e in entries} == {"CT", "MRI", "X-Ray"}


def lesion_contrast(pixels, cx, cy, r):
    """|mean of the disc of radius 0.6 r - median of the ring 1.3 r .. 1.8 r| around (cx, cy), in grey levels."""
    yy, xx = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]] + 0.5
    d = np.hypot(xx - cx, yy - cy)
    return abs(pixels[d < 0.6 * r].mean() - np.median(pixels[(d > 1.3 * r) & (d < 1.8 * r)]))


def box_center(box):
    x, y, w, h = box
    return x + w / 2, y + h / 2


def box_contains(box, point):
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def test_synthetic_answers_are_fixed_by_the_pixels(synthetic_root):
    """Answers <-> detection boxes <-> visible blobs in the JPEG <-> the scene re-generated from the seed."""
    domains = json.loads((synthetic_root / "generator.json").read_text())["domains"]
    checked = 0
    for split, domain in domains.items():
        by_image = {}
        for e in json.loads((synthetic_root / f"{split}.json").read_text()):
            by_image.setdefault(e["img_id"], []).append(e)
        for img_id, questions in by_image.items():
            folder = synthetic_root / "imgs" / f"xmlab{img_id}"
            pixels = np.asarray(Image.open(folder / "source.jpg").convert("L"), dtype=np.float64)
            boxes = [next(iter(b.items())) for b in json.loads((folder / "detection.json").read_text())]
            organs = {name: box for name, box in boxes if name != "lesion"}
            lesions = [box_center(box) + (box[2] / 2,) for name, box in boxes if name == "lesion"]

            # the file is the scene re-generated from (seed, img_id), up to JPEG error
            scene = synthetic.make_scene(0, img_id, domain)
            rendered = synthetic.render(scene, 112, np.random.default_rng([0, img_id]))
            assert np.abs(rendered - pixels).mean() < 2.0

            # every lesion is a visible blob about one 14-px patch across; a healthy liver has none at its centre
            for cx, cy, r in lesions:
                assert lesion_contrast(pixels, cx, cy, r) > 35 and 2 * r >= 10
            if "liver" in organs and not any(box_contains(organs["liver"], (cx, cy)) for cx, cy, _ in lesions):
                assert lesion_contrast(pixels, *box_center(organs["liver"]), 7) < 15

            for e in questions:
                q, a = e["question"], e["answer"]
                if q.startswith("How many lesions"):
                    assert a == str(len(lesions))
                elif q.startswith("Is there a lesion in the "):
                    site = q[len("Is there a lesion in the "):-1]
                    inside = site in organs and any(box_contains(organs[site], (cx, cy)) for cx, cy, _ in lesions)
                    if site.endswith("hemisphere"):  # the patient's left hemisphere is the image's right half
                        left = site.startswith("left")
                        inside = any((cx > 56) == left for cx, cy, _ in lesions)
                    assert a == ("yes" if inside else "no"), (img_id, q, a)
                elif q in ("Where is the lesion?", "Where is the abnormality located?") and lesions:
                    if a.startswith(("left", "right")):  # radiological convention: patient's left = image right
                        assert all((cx > 56) == a.startswith("left") for cx, cy, _ in lesions)
                    if a in organs:
                        assert all(box_contains(organs[a], (cx, cy)) for cx, cy, _ in lesions)
                elif q == "Is the heart enlarged?":
                    chest = organs["left lung"][0] + organs["left lung"][2] - organs["right lung"][0]
                    cut = 0.5 if e["modality"] == "X-Ray" else 0.375  # a CT heart is smaller beside wider lungs
                    assert a == ("yes" if organs["heart"][2] / chest > cut else "no")
                else:
                    continue
                checked += 1
    assert checked >= 40  # enough questions of these kinds were actually checked


def test_synthetic_target_domain_differs_from_source(synthetic_root):
    """The target scanner has a raised black level and more noise: compare the empty top-left corners."""
    domains = json.loads((synthetic_root / "generator.json").read_text())["domains"]
    stats = {"source": [], "target": []}
    for split, domain in domains.items():
        for img_id in {e["img_id"] for e in json.loads((synthetic_root / f"{split}.json").read_text())}:
            pixels = np.asarray(Image.open(synthetic_root / f"imgs/xmlab{img_id}/source.jpg").convert("L"),
                                dtype=float)
            corner = pixels[:8, :8]
            stats[domain].append((corner.mean(), corner.std()))
    source, target = np.array(stats["source"]), np.array(stats["target"])
    assert target[:, 0].mean() > source[:, 0].mean() + 20
    assert target[:, 1].mean() > 1.5 * source[:, 1].mean()


def test_synthetic_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    real_write_image = synthetic.write_image
    calls = []

    def failing_write_image(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write_image(*args)

    monkeypatch.setattr(synthetic, "write_image", failing_write_image)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_synthetic(out, seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial copy is left
    monkeypatch.setattr(synthetic, "write_image", real_write_image)
    synthetic.write_synthetic(out, seed=0, n_source_images=1, n_validate_images=1, n_target_images=1, n_dev_images=1)
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        synthetic.write_synthetic(out, seed=0)


def test_synthetic_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(out), "--seed", "3", "--n-source-images", "2",
                                      "--n-validate-images", "1", "--n-target-images", "2", "--n-dev-images", "1",
                                      "--image-size", "56"])
    synthetic.main()
    assert json.loads((out / "generator.json").read_text())["seed"] == 3
    assert sorted(p.name for p in (out / "imgs").iterdir()) == [f"xmlab{i}" for i in range(6)]
    with Image.open(out / "imgs" / "xmlab4" / "source.jpg") as img:
        assert img.size == (56, 56)
    assert "synthetic/test: " in capsys.readouterr().out


# -----------------------------------------------------------------------------
# paraphrases

def squad_words(s):
    """SQuAD answer normalisation (lowercase, drop punctuation and articles), as a set of words."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return set(re.sub(r"\b(a|an|the)\b", " ", s).split())


def test_paraphrases_keep_every_canonical_word():
    assert 25 <= len(synthetic.PARAPHRASES) <= 45  # a small answer vocabulary
    for canonical, forms in synthetic.PARAPHRASES.items():
        assert forms[0] == canonical and len(forms) >= 2 and len(set(forms)) == len(forms)
        for form in forms:
            assert squad_words(canonical) <= squad_words(form), (canonical, form)
    assert not squad_words("left lung") <= squad_words("lung, right")  # the check can fail


def test_paraphrase_draws_canonical_half_the_time():
    rng = random.Random(0)
    forms = synthetic.PARAPHRASES["left lung"]
    draws = Counter(synthetic.paraphrase("left lung", rng) for _ in range(4000))
    assert set(draws) == set(forms)
    assert 0.45 <= draws["left lung"] / 4000 <= 0.55
    with pytest.raises(ValueError, match="'pneumothorax'"):
        synthetic.paraphrase("pneumothorax", rng)


# -----------------------------------------------------------------------------
# images: 16-bit scans windowed, unreadable files named, a split checked before any model loads

def gradient_16bit(path, mode="I;16"):
    """A 4 x 256 greyscale gradient whose column k holds 1000 + 100 k (1000 ... 26500), saved in `mode`."""
    pixels = np.tile(1000 + 100 * np.arange(256), (4, 1))
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    image = Image.frombytes(mode, (256, 4), pixels.astype(dtype).tobytes())
    image.save(path)
    return path


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif"), ("F", ".tif")])
def test_open_image_windows_high_bit_depth_min_max(tmp_path, mode, suffix):
    path = gradient_16bit(tmp_path / f"scan{suffix}", mode)
    assert Image.open(path).mode == mode
    if mode == "I;16":  # the bug: PIL alone clips every pixel to white
        assert np.asarray(Image.open(path).convert("RGB")).min() == 255
    pixels = np.asarray(data.open_image(path))
    assert pixels.shape == (4, 256, 3) and pixels.dtype == np.uint8
    # by hand: min 1000, max 26500, so (1000 + 100 k - 1000) * 255 / 25500 = k exactly
    assert (pixels == np.arange(256)[None, :, None]).all()


def test_window_rounds_and_constant_image_is_black(tmp_path):
    assert (data.images.window_to_8bit(np.array([[100, 101, 103, 102]], dtype=np.uint16)).tolist()
            == [[0, 85, 255, 170]])
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero
        assert np.asarray(data.open_image(path)).max() == 0


def test_open_image_keeps_8bit_images_and_names_unreadable_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (np.asarray(data.open_image(tmp_path / "rgb.png")) == rgb).all()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert (np.asarray(data.open_image(tmp_path / "grey.png")) == rgb[..., :1]).all()
    nan = np.ones((4, 4), dtype=np.float32)
    nan[1, 2] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    (tmp_path / "text.png").write_bytes(b"not an image")
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 65535, (64, 64), dtype=np.uint16)).save(noisy)
    (tmp_path / "truncated.png").write_bytes(noisy.read_bytes()[:4000])
    for name, reason in [("nan.tif", "NaN"), ("text.png", "cannot identify"), ("truncated.png", "truncated"),
                         ("missing.png", "No such file")]:
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ".*" + reason):
            data.open_image(tmp_path / name)


def test_check_images_open_names_corrupt_file_and_qid(slake_root):
    records = data.load_split("slake", slake_root, "test")  # the file exists, so loading passes
    assert data.check_images_open(records, slake_root / "test.json") == 2
    bad = slake_root / "imgs" / "xmlab2" / "source.jpg"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(ValueError,
                       match=re.escape(f"1 of 2 images cannot be read (listed in {slake_root / 'test.json'})")
                       + r"(.|\n)*qid 12: cannot read image " + re.escape(str(bad))):
        data.check_images_open(data.load_split("slake", slake_root, "test"), slake_root / "test.json")


def test_check_images_open_needs_no_model_and_takes_seconds(tmp_path):
    """1000 small images are decoded in well under a minute, with nothing but data/ (no torch) imported."""
    records = []
    for i in range(1000):
        path = tmp_path / f"img{i}.png"
        Image.new("L", (16, 16), i % 256).save(path)
        records.append({"image": str(path), "qid": i})
    (tmp_path / "img7.png").write_bytes(b"corrupt")
    script = ("import json, sys, time; import data; records = json.load(sys.stdin); start = time.time()\n"
              "try:\n    data.check_images_open(records, 'test.json')\n"
              "except ValueError as err:\n    print(err)\n"
              "print(f'{time.time() - start:.2f}', 'torch' in sys.modules)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(records), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "1 of 1000 images cannot be read (listed in test.json):"
    assert lines[1].startswith(f"  qid 7: cannot read image {tmp_path / 'img7.png'}")
    seconds, torch_loaded = lines[-1].split()
    assert torch_loaded == "False" and float(seconds) < 20 and time.time() - start < 60


# -----------------------------------------------------------------------------
# an empty split says why

def test_chinese_only_split_with_lang_en_says_why(slake_root):
    path = slake_root / "test.json"
    write_json(path, [slake_entry(20, 1, "这是什么?", "CT", "OPEN", lang="zh"),
                      slake_entry(21, 2, "肺健康吗?", "否", "CLOSED", lang="zh")])
    with pytest.raises(ValueError, match=re.escape(f"slake: {path} has no questions with q_lang 'en' "
                                                   "(it has: zh 2); use --lang all or --lang zh")):
        data.load_split("slake", slake_root, "test", lang="en")
    assert [r["qid"] for r in data.load_split("slake", slake_root, "test", lang="zh")] == [20, 21]


def test_empty_annotation_files_say_so(tmp_path, slake_root):
    path = slake_root / "test.json"
    for text in ("[]", "  \n"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(f"annotation file {path} is empty")):
            data.load_split("slake", slake_root, "test")
    qa = tmp_path / "pvqa" / "qas" / "test" / "test_qa.pkl"
    qa.parent.mkdir(parents=True)
    qa.write_bytes(pickle.dumps([]))
    with pytest.raises(ValueError, match=re.escape(f"path_vqa: {qa} is empty")):
        data.load_split("path_vqa", tmp_path, "test")
    rad = tmp_path / "vqa_rad"
    write_json(rad / "VQA_RAD Dataset Public.json", VQA_RAD_ENTRIES[:2])  # no test_freeform / test_para entry
    with pytest.raises(ValueError, match=re.escape(f"vqa_rad: {rad / 'VQA_RAD Dataset Public.json'} has no test "
                                                   "questions") + ".*freeform 1, para 1"):
        data.load_split("vqa_rad", rad, "test")
