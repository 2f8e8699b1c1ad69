"""tiny.py and the synthetic protocol: the target-domain dev split, the base model's report, the import stack."""

import ast
import json
import re
from pathlib import Path

import pytest

import data
import tiny
from data import synthetic

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_source_images=6, n_validate_images=2, n_target_images=3, n_dev_images=2)
SIZES = dict(hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=2)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("tiny") / "synthetic", seed=0, **SMALL)


def image_ids(root, split):
    return {e["img_id"] for e in json.loads((root / f"{split}.json").read_text())}


def test_dev_split_is_target_domain_with_its_own_images(bench_root, slake_folder):
    domains = json.loads((bench_root / "generator.json").read_text())["domains"]
    assert domains == {"train": "source", "validate": "source", "test": "target", "dev": "target"}
    dev = data.load_split("synthetic", bench_root, "dev")
    assert len(dev) >= 7 * SMALL["n_dev_images"] and all(r["answer"] is not None for r in dev)
    ids = {split: image_ids(bench_root, split) for split in synthetic.SPLITS}
    assert len(ids["dev"]) == SMALL["n_dev_images"] and len(ids["test"]) == SMALL["n_target_images"]
    for split in ("train", "validate", "test"):
        assert ids["dev"].isdisjoint(ids[split])
    for img_id in ids["dev"]:  # drawn by the target scanner
        assert synthetic.make_scene(0, img_id, "target")["look"]["noise"] > 0.02
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_split("slake", slake_folder, "dev")  # SLAKE itself has no dev split


def test_default_benchmark_has_a_large_test_split():
    assert synthetic.N_TARGET_IMAGES * 7 >= 1000  # at least 7 questions per image: >= 1000 test questions


def test_premises_from_a_report():
    def scores(overall, closed):
        return {"overall": overall, "open_recall": overall, "closed_acc": closed}

    def report(source_overall, source_closed, target_overall):
        return {"source_validate": {"greedy": scores(source_overall, source_closed)},
                "target_test": {"greedy": scores(target_overall, 50.0)}}

    assert all(tiny.premises(report(85.0, 80.0, 79.0)).values())
    assert list(tiny.premises(report(85.0, 70.0, 79.0)).values()) == [True, False, True]
    assert list(tiny.premises(report(85.0, 80.0, 81.0)).values()) == [True, True, False]


def test_build_and_report_of_a_tiny_model(bench_root, tmp_path):
    out = tiny.ensure_tiny_base(tmp_path / "base", bench_root, seed=0, sizes=SIZES,
                                warm={"steps": 2, "batch_size": 2})
    assert (out / "config.json").is_file() and not (tmp_path / "base.partial").exists()
    recipe = json.loads((out / "build.json").read_text())
    assert recipe["warm_start"]["steps"] == 2 and recipe["sizes"] == SIZES
    same = tiny.ensure_tiny_base(out, bench_root, sizes=SIZES, warm={"steps": 2, "batch_size": 2})
    assert same == out  # built once: a second call with the same recipe does nothing
    with pytest.raises(SystemExit, match=f"{re.escape(str(out))}.*built with.*'steps': 2.*delete it"):
        tiny.ensure_tiny_base(out, bench_root)  # the default recipe: an older build is refused, not reused
    with pytest.raises(SystemExit, match=f"{re.escape(str(out))}.*built with seed 0.*asks seed 1"):
        tiny.ensure_tiny_base(out, bench_root, seed=1, sizes=SIZES, warm={"steps": 2, "batch_size": 2})
    report = tiny.write_report(out, bench_root, samples=2)
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["source_validate"]) == {"greedy"}
    assert set(report["target_test"]) == {"greedy", "majority", "fpl"}
    for entries in (report["source_validate"], report["target_test"]):
        for scores in entries.values():
            assert set(scores) == {"overall", "open_recall", "closed_acc"}
            assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert len(report["premises"]) == 3


def imported_modules(path):
    tree = ast.parse(Path(path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_py_is_the_bottom_of_the_import_stack():
    ours = {p.stem for p in REPO.glob("*.py")} | {"data"}
    assert not imported_modules(REPO / "model.py") & ours
    assert "tiny" not in imported_modules(REPO / "evaluate.py")  # tiny imports evaluate, not the other way
    source = (REPO / "model.py").read_text()
    assert not re.search(r"def (warm_start|build_random_tiny|train_tokenizer)", source)
