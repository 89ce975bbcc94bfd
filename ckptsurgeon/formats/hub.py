"""``hf://org/name[@revision]``: a model in the local Hugging Face cache, found offline.

The cache is the one huggingface_hub keeps (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``, read when a name is resolved, not when anything is imported):
``models--org--name/refs/<branch or tag>`` holds a commit hash, ``snapshots/<commit>/`` the
repository's files as symlinks to ``blobs/<hash>``. The revision is looked up with
huggingface_hub's own ``snapshot_download(..., local_files_only=True)``, which reads refs
and snapshots and never opens a connection; nothing is ever downloaded. The result is the
snapshot folder, a Hugging Face-style folder the readers already open.

Before a snapshot is handed on, every entry in it is checked: a link must land on a blob of
that same repository (anything else, such as a link to ``~/.ssh``, is refused), and the blob
must be there. huggingface_hub is imported inside these functions only, so a CLI given a
plain path never imports it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ckptsurgeon.errors import CkptSurgeonError, InputError, UnsafeInputError, UsageError
from ckptsurgeon.paths import HF_PREFIX, is_hf, within

__all__ = ["HF_PREFIX", "Snapshot", "cache_dir", "is_hf", "local_path", "parse", "resolve"]

# huggingface_hub's repo-id rule for one part (ASCII only): 1-96 characters of letters,
# digits, '-', '_' and '.', starting and ending with a letter, digit or '_'.
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
# A branch, tag or commit: git ref characters, no '..', no empty or dot-led segments.
_REVISION = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*)(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHORT_COMMIT = re.compile(r"[0-9a-fA-F]{7,39}")
_EXPECTED = "expected hf://org/name or hf://org/name@revision"
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubName:
    """A parsed ``hf://`` name."""

    text: str  # as the user wrote it, e.g. hf://org/name@v1.0
    repo_id: str  # org/name
    revision: str | None  # None: the default branch

    def fetch_command(self, revision: str | None = None) -> str:
        """The command that puts this model (at ``revision``) into the cache."""
        rev = revision if revision is not None else self.revision
        return f"hf download {self.repo_id}" + (f" --revision {rev}" if rev else "")


@dataclass(frozen=True)
class Snapshot:
    """A cached snapshot, checked: ``folder`` is what the readers open."""

    name: str  # the hf:// name as given, for messages and Checkpoint.path
    repo_id: str
    revision: str  # as asked for (the default branch when none was)
    commit: str
    folder: str  # <cache>/models--org--name/snapshots/<commit>


def parse(text: str) -> HubName:
    """Split ``hf://org/name[@revision]``; UsageError (exit 2) naming what is wrong."""
    if not is_hf(text):
        raise UsageError(f"{text}: not an hf:// name; {_EXPECTED}")
    rest = text[len(HF_PREFIX) :]

    def bad(reason: str) -> UsageError:
        return UsageError(f"{text}: not a Hugging Face model name ({reason}); {_EXPECTED}")

    if not rest:
        raise bad("nothing after hf://")
    repo, at, revision = rest.partition("@")
    parts = repo.split("/")
    if len(parts) == 1:
        raise bad(f"{repo!r} has no organisation or user")
    if len(parts) > 2:
        raise bad("too many '/'; name the repository, not a file in it")
    for part in parts:
        if not part:
            raise bad("empty organisation or name")
        odd = sorted({c for c in part if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if odd:
            raise bad(f"bad character {odd[0]!r} in {part!r}")
        if not _PART.fullmatch(part) or "--" in part or ".." in part or part.endswith(".git"):
            raise bad(
                f"{part!r}: 1-96 letters, digits, '-', '_', '.', not starting or ending "
                "with '-' or '.', no '--' or '..'"
            )
    if at:
        if not revision:
            raise bad("empty revision after '@'")
        if (
            "@" in revision
            or ".." in revision
            or revision.endswith(".lock")
            or len(revision) > 255
            or not _REVISION.fullmatch(revision)
        ):
            raise bad(f"bad revision {revision!r}")
        if _COMMIT.fullmatch(revision.lower()):
            revision = revision.lower()
    return HubName(text, "/".join(parts), revision if at else None)


def cache_dir() -> str:
    """The hub cache folder, from the environment as it is now, in huggingface_hub's order:
    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

    huggingface_hub's own ``constants.HF_HUB_CACHE`` is fixed when it is first imported;
    reading the environment here keeps an environment changed since then (a test, a caller
    that sets ``HF_HUB_CACHE`` itself) in force."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        hub = os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return os.path.abspath(os.path.expandvars(os.path.expanduser(hub)))


def _cached_revisions(repo_dir: str) -> list[str]:
    """Branches and tags (refs), then commits (snapshots) the cache holds for a repo."""
    refs_dir = os.path.join(repo_dir, "refs")
    refs: list[str] = []
    for root, _dirs, files in os.walk(refs_dir):
        refs.extend(
            os.path.relpath(os.path.join(root, f), refs_dir).replace(os.sep, "/") for f in files
        )
    snapshots = os.path.join(repo_dir, "snapshots")
    commits = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    return sorted(refs) + [c[:12] for c in commits]


def _expand_short_commit(repo_dir: str, revision: str) -> str:
    """A 7-39 digit commit prefix that is not a ref, naming one cached snapshot: the commit."""
    if not _SHORT_COMMIT.fullmatch(revision) or os.path.isfile(
        os.path.join(repo_dir, "refs", revision)
    ):
        return revision
    snapshots = os.path.join(repo_dir, "snapshots")
    prefix = revision.lower()
    found = [
        c
        for c in (os.listdir(snapshots) if os.path.isdir(snapshots) else [])
        if _COMMIT.fullmatch(c) and c.startswith(prefix)
    ]
    return found[0] if len(found) == 1 else revision


def resolve(text: str) -> Snapshot:
    """The checked snapshot folder ``hf://org/name[@revision]`` stands for, offline.

    UsageError for a malformed name; InputError (exit 3) for a model or revision that is not
    cached (the message gives the command that fetches it) or a link to a missing blob;
    UnsafeInputError (exit 3) for a link that leaves the repository's blobs.
    """
    name = parse(text)
    cache = cache_dir()
    org, model = name.repo_id.split("/")
    repo_dir = os.path.join(cache, f"models--{org}--{model}")
    if not os.path.isdir(repo_dir):
        raise InputError(
            f"{text}: not in the Hugging Face cache ({cache}); nothing is downloaded, "
            f"fetch it with: {name.fetch_command()}"
        )
    try:
        from huggingface_hub import snapshot_download

        try:
            from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
        except ImportError:  # huggingface_hub before 0.24 kept them in utils
            from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise InputError(
            f"{text}: reading the Hugging Face cache needs huggingface_hub "
            '(pip install "ckptsurgeon[hub]")'
        ) from None
    revision = _expand_short_commit(repo_dir, name.revision or DEFAULT_REVISION)
    try:
        # local_files_only: refs and snapshots are read from disk; no request is ever made.
        folder = snapshot_download(
            name.repo_id, revision=revision, cache_dir=cache, local_files_only=True
        )
    except HFValidationError as exc:
        raise UsageError(f"{text}: {_one_line(exc)}; {_EXPECTED}") from None
    except LocalEntryNotFoundError as exc:
        # Newer huggingface_hub records each commit's file list (trees/<commit>.json) and checks it.
        if type(exc).__name__ == "IncompleteSnapshotError":
            said = _one_line(exc)
            missing = re.search(r"\d+ file\(s\) are missing \(.*?\)(?=\. )", said)
            raise InputError(
                f"{text}: the cached snapshot is incomplete "
                f"({missing.group(0) if missing else said}); "
                f"fetch it with: {name.fetch_command()}"
            ) from None
        cached = _cached_revisions(repo_dir)
        raise InputError(
            f"{text}: revision {name.revision or DEFAULT_REVISION!r} is not in the Hugging "
            f"Face cache ({repo_dir}; cached: {', '.join(cached) or 'nothing'}); "
            f"fetch it with: {name.fetch_command(name.revision or DEFAULT_REVISION)}"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{text}: cannot read the Hugging Face cache: {_one_line(exc)}") from None
    folder = os.fspath(folder)
    real_repo = os.path.realpath(repo_dir)
    commit = os.path.basename(os.path.normpath(folder))
    if not _COMMIT.fullmatch(commit) or os.path.realpath(folder) != os.path.join(
        real_repo, "snapshots", commit
    ):
        raise UnsafeInputError(
            f"{text}: the cached snapshot {folder} is not a commit folder of "
            f"{os.path.join(real_repo, 'snapshots')}; refusing to read it"
        )
    _check_links(text, name, folder, commit, os.path.join(real_repo, "blobs"))
    return Snapshot(text, name.repo_id, name.revision or DEFAULT_REVISION, commit, folder)


def _check_links(text: str, name: HubName, folder: str, commit: str, blobs: str) -> None:
    """Every link in the snapshot lands on an existing blob of this repository."""
    for root, dirs, files in os.walk(folder):  # never descends through a linked folder
        for entry in sorted(dirs) + sorted(files):
            path = os.path.join(root, entry)
            if not os.path.islink(path):
                continue
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            target = os.path.realpath(path)
            if not within(target, blobs) or target == blobs:
                raise UnsafeInputError(
                    f"{text}: {rel} in the cached snapshot {commit[:12]} links outside the "
                    f"cache's blobs for {name.repo_id} (to {target}); refusing to follow it"
                )
            if not os.path.isfile(target):
                raise InputError(
                    f"{text}: {rel} in the cached snapshot {commit[:12]} links to a missing "
                    f"blob ({target}); fetch it again with: {name.fetch_command()}"
                )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def local_path(path: str) -> str:
    """``path`` itself, or for an ``hf://`` name the checked snapshot folder it stands for
    (for code that needs the files on disk: copying a model's extras, hashing ahead)."""
    return resolve(path).folder if is_hf(path) else path


@contextmanager
def named_as(snapshot: Snapshot) -> Iterator[None]:
    """Errors raised while reading the snapshot name ``hf://org/name/<file>``, not the cache
    path: ``/…/snapshots/<commit>/model.safetensors`` becomes ``hf://org/name/model.safetensors``."""
    try:
        yield
    except CkptSurgeonError as exc:
        exc.args = tuple(
            a.replace(snapshot.folder, snapshot.name) if isinstance(a, str) else a for a in exc.args
        )
        raise
