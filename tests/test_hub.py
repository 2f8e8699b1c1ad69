"""data/hub.py offline: a fake Hub on 127.0.0.1 serves a tiny SLAKE in the release's format, and the fetch runs
in a child process with the environment a user would set (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE), which
huggingface_hub reads when it is imported. Checked: the fetch unpacks a folder data.load_split reads (at
the revision with validation.json and at the one with validate.json), a second fetch with HF_HUB_OFFLINE=1
is served from the cache, a failed or interrupted fetch leaves no folder that passes for a finished one, and
offline or unreachable with nothing cached is one line naming BoKelvin/SLAKE and the manual route; a hub
model name that cannot be had is one line too."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image
from transformers import Qwen2_5_VLConfig

import data
import model
from data import hub

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 3
TINY = {"images": N_IMAGES, "questions": {s: 3 * N_IMAGES for s in ("train", "validate", "test")},
        "english": {s: 2 * N_IMAGES for s in ("train", "validate", "test")}}


# ----------------------------------------------------------------------------------------------
# A tiny SLAKE as the Hub repository holds it, and a fake Hub serving it


def jpeg(seed):
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40, 90, 160)).save(out, format="JPEG")
    return out.getvalue()


def imgs_zip():
    """imgs/xmlabN/source.jpg (+ a detection file), and the macOS metadata a zip made on a Mac carries."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i in range(N_IMAGES):
            zf.writestr(f"imgs/xmlab{i}/source.jpg", jpeg(i))
            zf.writestr(f"imgs/xmlab{i}/detection.json", "[]")
        zf.writestr("__MACOSX/imgs/._xmlab0", b"\0")
    return out.getvalue()


def split_json():
    """Per image: an OPEN and a CLOSED English question, and one in Chinese (the SLAKE format of conftest.py)."""
    entries = []
    for i in range(N_IMAGES):
        for question, answer, answer_type, lang in [("What modality is this?", "CT", "OPEN", "en"),
                                                    ("Is there a lesion?", "Yes", "CLOSED", "en"),
                                                    ("这是什么成像方式?", "CT", "OPEN", "zh")]:
            entries.append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "question": question, "answer": answer,
                            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type,
                            "base_type": "vqa", "content_type": "Modality", "triple": ["vhead", "_", "_"],
                            "qid": len(entries)})
    return json.dumps(entries).encode()


def repository(validate_name, archive=None):
    files = {"README.md": b"# SLAKE\n", "imgs.zip": imgs_zip() if archive is None else archive,
             "train.json": split_json(), "test.json": split_json(), validate_name: split_json()}
    return files


# revision -> (commit, files, files whose download fails with a server error)
REVISIONS = {
    "main": ("a" * 40, repository("validation.json"), set()),  # after the rename
    "v1": ("b" * 40, repository("validate.json"), set()),  # before it
    "corrupt": ("c" * 40, repository("validation.json", archive=b"PK\x03\x04 not a zip"), set()),
    "flaky": ("d" * 40, repository("validation.json"), {"imgs.zip"}),
}
COMMITS = {commit: (commit, files, failing) for commit, files, failing in REVISIONS.values()}


class FakeHub(BaseHTTPRequestHandler):
    """The three requests huggingface_hub's snapshot_download makes for one dataset repository: the revision's
    commit (/api/datasets/R/revision/REV), the file list (/api/datasets/R/tree/COMMIT) and each file
    (HEAD, then GET /datasets/R/resolve/COMMIT/FILE)."""

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        path = unquote(urlsplit(self.path).path)
        api, files = f"/api/datasets/{hub.SLAKE_REPO}/", f"/datasets/{hub.SLAKE_REPO}/resolve/"
        if path.startswith(api + "revision/") and path[len(api + "revision/"):] in REVISIONS:
            commit, content, _ = REVISIONS[path[len(api + "revision/"):]]
            return self.send(json.dumps({"id": hub.SLAKE_REPO, "sha": commit,
                                         "siblings": [{"rfilename": name} for name in content]}).encode(), body)
        if path.startswith(api + "tree/") and path[len(api + "tree/"):] in COMMITS:
            _, content, _ = COMMITS[path[len(api + "tree/"):]]
            return self.send(json.dumps([{"type": "file", "path": name, "size": len(blob),
                                          "oid": hashlib.sha1(blob).hexdigest()}
                                         for name, blob in content.items()]).encode(), body)
        if path.startswith(files):
            revision, _, name = path[len(files):].partition("/")
            commit, content, failing = REVISIONS.get(revision) or COMMITS.get(revision) or (None, {}, set())
            if name in content and not (body and name in failing):
                return self.send(content[name], body, {"X-Repo-Commit": commit,
                                                       "ETag": f'"{hashlib.sha256(content[name]).hexdigest()}"'})
            if name in content:
                return self.send(b"server error", body, status=500)
        self.send(b"not found", body, {"X-Error-Code": "RepositoryNotFound"}, status=404)

    def send(self, payload, body, headers=None, status=200):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


FETCH = """
import functools, json, sys
from data import hub
import data
hub.fetch_slake = functools.partial(hub.fetch_slake, manifest=hub.Manifest(**json.loads(sys.argv[1])),
                                    revision=sys.argv[3] or None)
if sys.argv[4] == "interrupt":  # killed while unpacking: one image written, then Ctrl-C
    def unpack_images(archive, folder):
        folder.mkdir(parents=True)
        (folder / "half.jpg").write_bytes(b"")
        raise KeyboardInterrupt
    hub.unpack_images = unpack_images
print(data.resolve_root("slake", None, sys.argv[2], "unused"))
"""


def child_env(parent, **hf):
    """This environment less the user's HF_* settings (a token, offline mode, a cache), the cache in `parent`,
    no telemetry, and the given variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(parent / "hf-home"), "HF_HUB_CACHE": str(parent / "hf-cache"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", **hf}


def fetch(parent, env, revision="", manifest=TINY, mode=""):
    """resolve_root("slake") with no --data-root, in a child process with the given HF_* variables."""
    argv = [sys.executable, "-c", FETCH, json.dumps(manifest), str(parent / "datasets"), revision, mode]
    return subprocess.run(argv, cwd=REPO, env=child_env(parent, **env), capture_output=True, text=True, timeout=120)


def leftovers(parent):
    """Temporary folders of a fetch left in datasets/."""
    return sorted(p.name for p in parent.glob("datasets/.slake.partial-*"))


# ----------------------------------------------------------------------------------------------
# Fetch


def test_fetch_unpacks_a_folder_the_loader_reads_then_the_cache_serves_it_offline(endpoint, tmp_path):
    run = fetch(tmp_path, {"HF_ENDPOINT": endpoint})
    assert run.returncode == 0, run.stderr
    root = tmp_path / "datasets" / "slake"
    assert run.stdout.splitlines()[-1] == str(root)
    records = data.load_split("slake", root, "test")
    assert len(records) == 2 * N_IMAGES and records[0]["image"] == str(root / "imgs" / "xmlab0" / "source.jpg")
    assert len(data.load_split("slake", root, "validate")) == 2 * N_IMAGES  # validation.json, read as validate
    assert json.loads((root / "hub_source.json").read_text())["files"]["validate"] == "validation.json"
    assert not (root / "imgs" / "__MACOSX").exists() and not (root / "__MACOSX").exists()
    assert leftovers(tmp_path) == []

    # no datasets/slake again, offline: huggingface_hub serves the cached files (HF_HUB_CACHE) without the network
    os.rename(root, tmp_path / "first")
    offline = fetch(tmp_path, {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr
    assert len(data.load_split("slake", root, "test")) == 2 * N_IMAGES


def test_the_revision_with_validate_json_is_read_too(endpoint, tmp_path):
    run = fetch(tmp_path, {"HF_ENDPOINT": endpoint}, revision="v1")
    assert run.returncode == 0, run.stderr
    root = tmp_path / "datasets" / "slake"
    assert json.loads((root / "hub_source.json").read_text()) == {
        "repo": "BoKelvin/SLAKE", "commit": "b" * 40,
        "files": {"train": "train.json", "validate": "validate.json", "test": "test.json"}}
    assert len(data.load_split("slake", root, "validate")) == 2 * N_IMAGES


WRONG_COUNT = dict(TINY, english=dict(TINY["english"], test=1061))


@pytest.mark.parametrize("revision, manifest, mode, message", [
    ("flaky", TINY, "", "cannot fetch the Hub dataset BoKelvin/SLAKE"),  # imgs.zip's download fails (500)
    ("corrupt", TINY, "", "not the SLAKE release this code expects: imgs.zip: File is not a zip file"),
    ("main", WRONG_COUNT, "", "test: 6 English questions, the release has 1061"),  # counts differ
    ("main", TINY, "interrupt", "KeyboardInterrupt"),  # stopped half-way through unpacking
], ids=["download-fails", "not-a-zip", "counts-differ", "interrupted"])
def test_a_failed_fetch_leaves_no_folder_that_passes_for_finished(endpoint, tmp_path, revision, manifest, mode,
                                                                   message):
    run = fetch(tmp_path, {"HF_ENDPOINT": endpoint}, revision, manifest, mode)
    assert run.returncode != 0 and message in run.stderr, run.stderr
    if mode != "interrupt":
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "datasets" / "slake").exists() and leftovers(tmp_path) == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env, why", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and the cache holds no complete copy"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, "no copy in the cache and the Hub cannot be reached"),
], ids=["offline", "unreachable"])
def test_offline_or_unreachable_with_nothing_cached_is_one_line(tmp_path, env, why):
    run = fetch(tmp_path, {k: v.format(port=free_port()) for k, v in env.items()})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("--dataset slake: cannot fetch the Hub dataset BoKelvin/SLAKE (") and why in line
    assert f"in {tmp_path / 'datasets' / 'slake'}, or pass --data-root PATH" in line
    assert not (tmp_path / "datasets" / "slake").exists()


# ----------------------------------------------------------------------------------------------
# Models


MODEL = """
import model
name = "nobody-here/no-such-model"
for call in (lambda: model.load_processors(name), lambda: model.load_model(name, "cpu", None)):
    try:
        call()
    except SystemExit as err:
        print(err)
model.load(name, device="cpu")
"""


def test_a_hub_model_that_cannot_be_had_is_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 and a name not in the (empty) cache: load, load_model and load_processors."""
    run = subprocess.run([sys.executable, "-c", MODEL], cwd=REPO, env=child_env(tmp_path, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [exit_line] = run.stderr.strip().splitlines()
    lines = run.stdout.strip().splitlines() + [exit_line]
    assert len(lines) == 3 and len(set(lines)) == 1, lines
    assert exit_line.startswith("model nobody-here/no-such-model: cannot load it from the Hugging Face Hub")
    assert "HF_HUB_OFFLINE is set" in exit_line and "pass the path of a local copy" in exit_line


def test_a_local_folder_keeps_its_own_error(tmp_path):
    """A folder with a configuration but no weights: transformers' own OSError, which names the folder."""
    Qwen2_5_VLConfig().save_pretrained(tmp_path)
    with pytest.raises(OSError, match=f"no file named model.safetensors.*{tmp_path}"):
        model.load_model(tmp_path, "cpu", None)
