"""The Hugging Face Hub: `--dataset slake` fetches itself, and what the Hub cannot give is one line.

SLAKE. Without --data-root and without a copy in datasets/slake, `data.resolve_root` calls `fetch_slake`,
which asks huggingface_hub (`snapshot_download`) for the Hub dataset BoKelvin/SLAKE: imgs.zip and the split
files train.json, test.json and validate.json, which the repository renamed validation.json at one revision
(either is taken, and written as validate.json, the release's name, which the SLAKE loader reads). The files
land in huggingface_hub's own cache, so its settings work as for any hub download and nothing here reads
them: HF_HOME / HF_HUB_CACHE (the cache; a second fetch, e.g. after deleting datasets/slake, is served from
it), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (the cache only), HF_TOKEN or `hf auth login` (the token).

The fetch is atomic. The release is unpacked into a temporary sibling folder (datasets/.slake.partial-XXXX),
checked, and only then renamed to datasets/slake, so a failed or interrupted fetch never leaves a folder that
passes for a finished one (a process killed outright may leave the .partial folder: it is never read, and
can be deleted). The check compares the copy with a `Manifest` of the release, SLAKE_1_0, whose numbers are
counted from the official annotation files: 14,028 questions (train 9,835, validate 2,099, test 2,094) over
642 images, of them in English train 4,919, validate 1,053 and test 1,061 (645 OPEN / 416 CLOSED); every
image a question names must be in imgs.zip. A copy that differs is refused, not unpacked: the paper's
numbers are on this release. `fetch_slake` takes the manifest as an argument (the tests pass their own).
Anything that goes wrong is one line (SystemExit) naming the repository and the manual route: put the
release in datasets/slake, or pass --data-root.

Models. `model_errors(name)` wraps transformers' from_pretrained in model.load_model / load_processors: a hub
name it cannot get (offline and not cached, a typo, a gated or private repository without a token that may
read it, the Hub unreachable) becomes one line naming the model, why, and what to do.

VQA-RAD and PathVQA are not fetched; their folders are asked for as before (data.DATA_LAYOUTS). Their Hub
copies, flaviagiammarino/vqa-rad and flaviagiammarino/path-vqa, are not the releases our loaders read:
  * they are parquet shards with the image bytes inline and no question ids, image names or answer type;
    reading them needs pyarrow, which this project does not otherwise depend on (nor is it installed here);
  * VQA-RAD's answer type is the annotators' own: CLOSED also covers questions with a few choices ("left or
    right?"), not only yes/no. Inferring it from yes/no answers, as the PathVQA loader must (PathVQA never had
    one), would move questions between the closed-accuracy and open-recall columns, and the scores would no
    longer compare with the paper's;
  * the PathVQA copy drops the release's duplicate image-question-answer triplets (32,632 of its 32,795
    pairs; train / validation / test 19,654 / 6,259 / 6,719), so its test split is not the official one.
"""

import json
import os
import shutil
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx  # huggingface_hub's own export of its HTTP client (httpx2 here)

from . import slake

SLAKE_REPO = "BoKelvin/SLAKE"
SPLIT_FILES = {"train": ("train.json",), "validate": ("validate.json", "validation.json"), "test": ("test.json",)}
SLAKE_FILES = ["imgs.zip", *(name for names in SPLIT_FILES.values() for name in names)]
SLAKE_LAYOUT = "imgs/xmlabN/source.jpg + train.json, validate.json, test.json"

# What huggingface_hub raises when it cannot give a file: its own errors are all OSError subclasses
# (HfHubHTTPError and its RepositoryNotFoundError / GatedRepoError / RevisionNotFoundError, LocalEntryNotFoundError
# and IncompleteSnapshotError, OfflineModeIsEnabled), transformers re-raises them as OSError, and the transport
# errors it lets through (a proxy error, a connection that keeps failing mid-download) are httpx.HTTPError.
HUB_ERRORS = (OSError, httpx.HTTPError)


@dataclass(frozen=True)
class Manifest:
    """What a complete copy of SLAKE holds: the distinct images its questions name, and per split the
    questions in all languages and in English."""
    images: int
    questions: dict
    english: dict


SLAKE_1_0 = Manifest(images=642, questions={"train": 9835, "validate": 2099, "test": 2094},
                     english={"train": 4919, "validate": 1053, "test": 1061})


# ----------------------------------------------------------------------------------------------
# SLAKE


def fetch_slake(dest, manifest=SLAKE_1_0, repo_id=SLAKE_REPO, revision=None, **hub_options):
    """Fetch SLAKE from the Hub into the folder `dest` (which must not exist yet) and return it.

    hub_options go to huggingface_hub.snapshot_download as they are (token, cache_dir, ...); by default it reads
    its own environment. A SystemExit of one line when the files cannot be had or are not the release
    `manifest` describes; `dest` then does not exist."""
    dest = Path(dest)
    print(f"--dataset slake: {dest} does not exist and no --data-root was given: fetching the Hub dataset "
          f"{repo_id} (imgs.zip and the split files) through huggingface_hub")
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                          allow_patterns=SLAKE_FILES, **hub_options))
    except HUB_ERRORS as err:
        raise SystemExit(one_line(f"--dataset slake: cannot fetch the Hub dataset {repo_id} ({reason(err)}); "
                                  f"{remedy(err, manual_route(dest))}")) from err
    source = f"{repo_id} (commit {snapshot.name})"
    files = split_files(snapshot, source, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        unpack(snapshot / "imgs.zip", files, partial, source, manifest, dest)
        (partial / "hub_source.json").write_text(json.dumps(
            {"repo": repo_id, "commit": snapshot.name, "files": {s: p.name for s, p in files.items()}}, indent=1))
        publish(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already once published
    print(f"--dataset slake: {source} unpacked into {dest} ({manifest.images} images; "
          + ", ".join(f"{split} {manifest.questions[split]} questions ({manifest.english[split]} in English)"
                      for split in manifest.questions) + ")")
    return dest


def manual_route(dest):
    return f"put the SLAKE release ({SLAKE_LAYOUT}) in {dest}, or pass --data-root PATH"


def split_files(snapshot, source, dest):
    """{split: its annotation file in the snapshot} (validate: validate.json or validation.json)."""
    files = {}
    missing = [] if (snapshot / "imgs.zip").is_file() else ["imgs.zip"]
    for split, names in SPLIT_FILES.items():
        found = [snapshot / name for name in names if (snapshot / name).is_file()]
        if found:
            files[split] = found[0]
        else:
            missing.append(" or ".join(names))
    if missing:
        raise SystemExit(f"--dataset slake: {source} has no {', '.join(missing)}; {manual_route(dest)}")
    return files


def unpack(archive, files, folder, source, manifest, dest):
    """imgs.zip and the split files into `folder`, then the check against the manifest (SystemExit if not)."""
    try:
        unpack_images(archive, folder / "imgs")
        for split, path in files.items():
            shutil.copyfile(path, folder / f"{split}.json")
        problems = differences(folder, manifest)
    except zipfile.BadZipFile as err:
        problems = [f"imgs.zip: {err}"]
    except ValueError as err:
        problems = [str(err)]
    except OSError as err:
        raise SystemExit(one_line(f"--dataset slake: cannot unpack {source} next to {dest} ({err}); "
                                  f"nothing was written to {dest}")) from err
    if problems:
        raise SystemExit(one_line(f"--dataset slake: {source} is not the SLAKE release this code expects: "
                                  f"{'; '.join(problems)}. Nothing was written to {dest}; {manual_route(dest)}"))


def unpack_images(archive, folder):
    """imgs.zip's files into `folder`. Its members are imgs/xmlabN/... (a leading imgs/ is dropped; xmlabN/...
    is read too); macOS metadata (__MACOSX/) is skipped; a member that would land outside `folder` or is a
    link is refused."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            parts = name.parts[1:] if name.parts[:1] == ("imgs",) else name.parts
            if info.is_dir() or not parts or parts[0] == "__MACOSX":
                continue
            if name.is_absolute() or ".." in parts or stat.S_ISLNK(info.external_attr >> 16):
                raise ValueError(f"imgs.zip member {info.filename!r} is a link or lands outside imgs/")
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def differences(folder, manifest):
    """How an unpacked copy differs from the manifest (empty: it is the release). Each split must also load
    through the SLAKE loader, which checks every question's fields."""
    problems, images = [], set()
    for split, expected in manifest.questions.items():
        path = folder / f"{split}.json"
        slake.load(folder, split, "all")  # the fields and answer types of every question
        entries = slake.read_json_list(path)
        english = sum(entry["q_lang"] == "en" for entry in entries)
        if len(entries) != expected:
            problems.append(f"{split}: {len(entries)} questions, the release has {expected}")
        if english != manifest.english[split]:
            problems.append(f"{split}: {english} English questions, the release has {manifest.english[split]}")
        images.update(entry["img_name"] for entry in entries)
    missing = sorted(name for name in images if not (folder / "imgs" / name).is_file())
    if missing:
        problems.append(f"{len(missing)} of the {len(images)} images the questions name are not in imgs.zip "
                        f"(e.g. {missing[0]})")
    if len(images) != manifest.images:
        problems.append(f"the questions name {len(images)} images, the release {manifest.images}")
    return problems


def publish(partial, dest):
    """Rename the finished folder to `dest`. If another process (a second rank) got there first, its copy
    stays and ours is dropped by the caller."""
    try:
        os.replace(partial, dest)
    except OSError:
        if not dest.is_dir():
            raise


# ----------------------------------------------------------------------------------------------
# One line for what the Hub cannot give


@contextmanager
def model_errors(name_or_path):
    """A hub model name transformers cannot get becomes a one-line SystemExit naming the model, why, and what to
    do. transformers (utils/hub.py, cached_files) raises OSError for it, from huggingface_hub's
    RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, LocalEntryNotFoundError or HfHubHTTPError.
    The errors of a local folder pass as they are."""
    try:
        yield
    except HUB_ERRORS as err:
        if Path(str(name_or_path)).expanduser().is_dir():
            raise
        raise SystemExit(one_line(f"model {name_or_path}: cannot load it from the Hugging Face Hub ({reason(err)}); "
                                  f"{remedy(err, 'check the name, or pass the path of a local copy')}")) from err


def causes(err):
    """err and the exceptions it was raised from or during, outermost first."""
    chain = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def kind(err):
    """'gated', 'missing' (no such repository or revision, or no access), 'offline', 'unreachable' or 'other'."""
    chain = causes(err)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "gated"
    if any(isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)) for e in chain):
        return "missing"
    if is_offline_mode():
        return "offline"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return "unreachable"
    return "other"


def reason(err):
    """Why huggingface_hub could not give it, in a few words."""
    chain = causes(err)
    innermost = f"{type(chain[-1]).__name__}: {first_line(chain[-1])}"
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return "no such revision"
    return {
        "gated": "a gated repository, and the token in use (if any) has not been granted access",
        "missing": "no such repository, or a private one the token in use (if any) cannot read",
        "offline": "HF_HUB_OFFLINE is set and the cache holds no complete copy",
        "unreachable": ("the cached copy is incomplete" if any(isinstance(e, IncompleteSnapshotError) for e in chain)
                        else "no copy in the cache") + f" and the Hub cannot be reached: {innermost}",
    }.get(kind(err), innermost)


def remedy(err, manual):
    """What to do, for the kind of failure; `manual` is the way around the Hub."""
    return {
        "gated": f"accept its terms on the Hub and log in (hf auth login, or set HF_TOKEN), or {manual}",
        "missing": f"log in with an account that can read it (hf auth login, or set HF_TOKEN), or {manual}",
        "offline": f"run once without HF_HUB_OFFLINE to download it into the cache, or {manual}",
    }.get(kind(err), f"check the network (and HF_ENDPOINT), log in if it is gated or private (hf auth login, or "
                     f"set HF_TOKEN), set HF_HUB_OFFLINE=1 to use a copy already in the cache, or {manual}")


def first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else "(no message)"


def one_line(message):
    return " ".join(message.split())
