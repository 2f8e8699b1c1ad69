"""tiny.py and the synthetic protocol: the target-domain dev split, the base model's report, the shipped base
models (recipe and SHA-256 manifest), the import stack."""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import data
from models import tiny
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


# ----------------------------------------------------------------------------------------------
# The shipped base models (no build: the recipe and the hashes are read, not recomputed by training)


@pytest.fixture
def shipped_copy(tmp_path):
    return Path(shutil.copytree(tiny.SHIPPED_DIR, tmp_path / "models"))


@pytest.mark.parametrize("seed", tiny.SHIPPED_SEEDS)
def test_shipped_model_is_the_frozen_recipe_and_matches_the_manifest(seed):
    folder = tiny.shipped_model(seed)  # every file's SHA-256 checked against models/SHA256SUMS
    built = json.loads((folder / "build.json").read_text())
    assert (built["seed"], built["sizes"], built["warm_start"]) == (seed, tiny.SIZES, tiny.WARM_START)
    assert not Path(built["data_root"]).is_absolute()  # no machine's folder in a shipped file
    assert all(tiny.premises(tiny.read_report(folder)).values())
    needed = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json", "build.json", "report.json"}
    assert needed <= {p.name for p in folder.iterdir()}


def test_models_folder_holds_exactly_the_manifest_s_files():
    """Every file of a shipped model folder is in the manifest (models/ also holds tiny.py, the code that builds them)."""
    on_disk = {p.relative_to(tiny.SHIPPED_DIR).as_posix() for p in tiny.SHIPPED_DIR.glob("tiny-base-seed*/**/*")
               if p.is_file()}
    assert on_disk == set(tiny.read_manifest())
    assert {p.name for p in tiny.SHIPPED_DIR.iterdir() if p.is_file()} == {"SHA256SUMS", ".gitattributes", "tiny.py",
                                                                        "__init__.py"}
    assert {name.split("/")[0] for name in tiny.read_manifest()} == {f"tiny-base-seed{s}" for s in tiny.SHIPPED_SEEDS}


def test_model_tiny_is_the_shipped_model():
    assert tiny.resolve_model("tiny") == tiny.shipped_dir(0) == tiny.TINY_BASE_DIR
    assert tiny.resolve_model("tiny", 2) == tiny.shipped_dir(2)
    assert tiny.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(SystemExit, match="--tiny-seed 1 picks a shipped tiny base model: it needs --model tiny"):
        tiny.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct", 1)


def test_a_changed_or_missing_shipped_file_is_refused_by_name(shipped_copy):
    assert tiny.write_manifest(shipped_copy).read_bytes() == (tiny.SHIPPED_DIR / "SHA256SUMS").read_bytes()
    tokenizer = shipped_copy / "tiny-base-seed1" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    with pytest.raises(SystemExit, match=f"{re.escape(str(tokenizer))}: its SHA-256 .* is not the one in"):
        tiny.shipped_model(1, shipped_copy)
    config = shipped_copy / "tiny-base-seed0" / "config.json"
    config.unlink()
    with pytest.raises(SystemExit, match=f"{re.escape(str(config))}: missing"):
        tiny.shipped_model(0, shipped_copy)
    with pytest.raises(SystemExit, match="no shipped tiny base model of warm-start seed 3 .*python -m models.tiny --seed 3"):
        tiny.shipped_model(3, shipped_copy)
    (shipped_copy / "SHA256SUMS").unlink()
    with pytest.raises(SystemExit, match="SHA256SUMS: missing"):
        tiny.shipped_model(2, shipped_copy)


def test_a_recipe_change_without_a_rebuild_is_refused(monkeypatch):
    monkeypatch.setitem(tiny.WARM_START, "steps", tiny.WARM_START["steps"] + 1)
    with pytest.raises(SystemExit, match="tiny-base-seed0 was built with .*recipe changed without a rebuild"):
        tiny.shipped_model(0)


def test_ship_copies_a_finished_build_and_writes_the_manifest(shipped_copy, tmp_path):
    build = Path(shutil.copytree(shipped_copy / "tiny-base-seed2", tmp_path / "build"))
    recipe = json.loads((build / "build.json").read_text())
    (build / "build.json").write_text(json.dumps(dict(recipe, data_root=str(tiny.SYNTHETIC_DIR)), indent=1))
    root = tmp_path / "shipped"
    assert tiny.ship(2, build, root) == root / "tiny-base-seed2"
    assert tiny.shipped_model(2, root) == root / "tiny-base-seed2"
    assert json.loads((root / "tiny-base-seed2" / "build.json").read_text())["data_root"] == "artifacts/synthetic"
    assert (build / "report.json").is_file()  # copied, not moved
    (build / "report.json").unlink()
    with pytest.raises(SystemExit, match="report.json: missing; the build is unfinished"):
        tiny.ship(2, build, root)
    with pytest.raises(SystemExit, match="built with seed 2.*asks seed 1"):
        tiny.ship(1, build, root)


def test_compare_builds_names_the_weight_difference_and_the_scores(shipped_copy, tmp_path, capsys):
    shipped = shipped_copy / "tiny-base-seed0"
    assert tiny.compare_builds(shipped, shipped) == 0.0
    assert "model.safetensors: byte-identical" in capsys.readouterr().out
    rebuilt = Path(shutil.copytree(shipped, tmp_path / "rebuilt"))
    weights = load_file(rebuilt / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1.0
    save_file(weights, rebuilt / "model.safetensors", metadata={"format": "pt"})
    report = tiny.read_report(rebuilt)
    report["target_test"]["greedy"]["overall"] += 0.75
    (rebuilt / "report.json").write_text(json.dumps(report))
    assert tiny.compare_builds(shipped, rebuilt) == pytest.approx(0.75)
    out = capsys.readouterr().out
    assert "model.safetensors: DIFFERS" in out and "tokenizer.json: byte-identical" in out
    assert f"largest |weight difference|: 1 ({name})" in out
    assert re.search(r"target_test.greedy overall +\d+\.\d\d +\d+\.\d\d +\+0\.75", out)


def imported_modules(path):
    tree = ast.parse(Path(path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# The import graph is a stack: a module imports only modules below it in this list (no cycle can form). A rule's
# file (rules/NAME.py, "rules.*") imports no other rule; the door, rules/__init__.py, imports them all.
STACK = ["data", "model", "scale.parallel", "reward", "rollout", "centroid", "grpo", "scale.checkpoint",
         "scale.memory", "monitor", "evaluate", "models.tiny", "rules.*", "rules", "harness.flags", "harness.setup",
         "train", "experiments.bench", "experiments.ablate", "experiments.gpu_check"]


def our_module(path):
    parts = list(Path(path).relative_to(REPO).with_suffix("").parts)
    if parts[0] == "data":
        return "data"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module):
    """The module's place in STACK (a rule's file: the place of "rules.*"), or None when it is not ours."""
    if module in STACK:
        return STACK.index(module)
    if module.startswith("rules.") and module.count(".") == 1:
        return STACK.index("rules.*")
    return None


def imports_of(path):
    """Our modules that a file imports (data's submodules count as data)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {"data" if name.split(".")[0] == "data" else name for name in found if
            name.split(".")[0] == "data" or layer(name) is not None}


def test_the_import_graph_is_a_stack():
    files = [p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in ("tests", "docs", ".venv")]
    packages = {"scale", "experiments", "models", "harness"}
    assert {our_module(p) for p in files if layer(our_module(p)) is None} <= packages
    for path in files:
        module = our_module(path)
        if module in packages:  # a package's docstring-only __init__
            assert not imports_of(path), path
            continue
        above = [m for m in imports_of(path) if layer(m) >= layer(module) and m != module]
        assert not above, f"{path.relative_to(REPO)} imports {above}, which sit above it (or level with it)"
    source = (REPO / "model.py").read_text()
    assert not re.search(r"def (warm_start|build_random_tiny|train_tokenizer)", source)
