"""Hostile and corrupt inputs are refused cleanly.

SPEC: unreadable, corrupt or unsafe input exits 3 with one clear line on stderr and no
traceback; nothing in the input runs and no output appears. Every file here is built in
``tmp_path``. Most cases run in-process, through ``open_checkpoint`` (the exception type and
message) and through the click command itself (the exit-code mapping). The real CLI runs in
a subprocess for a representative handful, two at a time, because each subprocess spends
about 4 s importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shlex
import shutil
import struct
import subprocess
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_clean_failure, assert_same_tensors, materialise

from ckptsurgeon.cli import cli
from ckptsurgeon.errors import CkptSurgeonError, InputError, UnsafeInputError, UsageError
from ckptsurgeon.formats import open_checkpoint

RunCli = Callable[..., subprocess.CompletedProcess]
SYSTEM = f"{os.system.__module__}.system"  # posix.system here: what the pickle records

# --------------------------------------------------------------------------------------
# helpers


def _state() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "fc.bias": torch.ones(2),
    }


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    """The click command run in-process; the result shaped like ``run_cli``'s."""
    argv = [str(a) for a in args]
    result = CliRunner().invoke(cli, argv)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def _run_all(run_cli: RunCli, *argvs: Sequence[object]) -> list[subprocess.CompletedProcess]:
    """Run several real CLI subprocesses concurrently (each one mostly imports torch)."""
    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        return list(pool.map(lambda argv: run_cli(*argv), argvs))


def _assert_refused(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """SPEC's failure: the exit code, needles in the message, one line, no traceback."""
    assert_clean_failure(proc, code, *needles)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"


def _open_error(path: Path, allow: Sequence[str] = (), load: bool = False) -> CkptSurgeonError:
    """The library error opening ``path`` raises; fails the test on anything else."""
    try:
        ckpt = open_checkpoint(path, allow_globals=allow)
        if load:
            materialise(ckpt.tensors)
    except CkptSurgeonError as exc:
        return exc
    except Exception as exc:  # an escape: the CLI would print "internal error", exit 1
        pytest.fail(f"escaped as {type(exc).__name__}: {exc}")
    pytest.fail(f"{path} was accepted")


def _refused(
    path: Path,
    exc_type: type[CkptSurgeonError],
    *needles: str,
    allow: Sequence[str] = (),
    load: bool = False,
) -> CkptSurgeonError:
    """Refused by the library (type and message) and by the click command (exit code)."""
    exc = _open_error(path, allow, load)
    assert isinstance(exc, exc_type), (type(exc).__name__, str(exc))
    for needle in needles:
        assert needle in str(exc), (needle, str(exc))
    flags = [x for name in allow for x in ("--allow-global", name)]
    _assert_refused(
        _cli(
            "convert" if load else "inspect",
            path,
            *flags,
            *([path.parent / "out.safetensors"] if load else []),
        ),
        exc_type.exit_code,
        *needles,
    )
    assert not (path.parent / "out.safetensors").exists()
    return exc


class _Reduce:
    """Pickles as ``fn(*args)``: the trick a hostile checkpoint hides in its pickle."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args

    def __call__(self, *args: Any) -> Any:  # pickle insists the reduce callable is callable
        raise AssertionError("never called: only pickled")


def _payload(kind: str, marker: Path) -> tuple[object, str]:
    """A pickled object that would create ``marker`` when loaded, and the global to name."""
    touch = f"touch {shlex.quote(str(marker))}"
    if kind == "os.system":
        return _Reduce(os.system, (touch,)), SYSTEM
    if kind == "open":
        return _Reduce(open, (str(marker), "w")), "io.open"
    if kind == "eval":
        return _Reduce(eval, (f"open({str(marker)!r}, 'w')",)), "builtins.eval"
    if kind == "getattr-chain":  # getattr(__import__("os"), "system")(touch)
        system = _Reduce(getattr, (_Reduce(__import__, ("os",)), "system"))
        return _Reduce(system, (touch,)), "builtins.getattr"
    if kind == "nested-pickle.loads":
        inner = pickle.dumps(_Reduce(open, (str(marker), "w")), protocol=2)
        return _Reduce(pickle.loads, (inner,)), "pickle.loads"
    raise ValueError(kind)


def _save_hostile(path: Path, kind: str, marker: Path, legacy: bool = False) -> str:
    obj, name = _payload(kind, marker)
    torch.save(
        {"state_dict": _state(), "extra": obj}, path, _use_new_zipfile_serialization=not legacy
    )
    return name


def _save_scripted(path: Path) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated, but users still have these
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)


PAYLOADS = ["os.system", "open", "eval", "getattr-chain", "nested-pickle.loads"]


# --------------------------------------------------------------------------------------
# pickles that would run code


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_code_execution_pickle_is_refused_naming_the_global(
    tmp_path: Path, kind: str, legacy: bool
) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    name = _save_hostile(path, kind, marker, legacy)
    _refused(path, UnsafeInputError, name)
    _refused(path, UnsafeInputError, name, load=True)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize(
    "protocol", [2, pickle.HIGHEST_PROTOCOL], ids=["protocol-2", "protocol-highest"]
)
def test_plain_pickle_with_payload_is_refused_naming_the_global(
    tmp_path: Path, protocol: int
) -> None:
    """A bare ``pickle.dump`` file (no torch framing) under a torch suffix."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pkl"
    obj, name = _payload("os.system", marker)
    path.write_bytes(pickle.dumps({"w": obj}, protocol=protocol))
    exc = _refused(path, InputError, name)
    assert "weights_only` set to `False`" not in str(exc), f"advises unsafe loading: {exc}"
    assert not marker.exists()


def test_refusal_does_not_advise_admitting_a_global_that_is_never_admitted(
    tmp_path: Path,
) -> None:
    """The hint must not name a flag value that ``--allow-global`` then refuses (exit 2)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    _save_hostile(path, "os.system", marker)
    exc = _refused(path, UnsafeInputError, SYSTEM)
    assert f"--allow-global {SYSTEM}" not in str(exc), str(exc)


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    _save_scripted(path)
    exc = _refused(path, UnsafeInputError)
    assert "torchscript" in str(exc).lower(), str(exc)
    assert "corrupt" not in str(exc) and "truncated" not in str(exc), str(exc)


def test_cli_refuses_code_execution_pickles(tmp_path: Path, run_cli: RunCli) -> None:
    """The real command on a zip pickle calling os.system and a legacy one calling open."""
    marker = tmp_path / "MARKER"
    zipped = tmp_path / "hostile.pt"
    legacy = tmp_path / "legacy.pt"
    out = tmp_path / "out.safetensors"
    _save_hostile(zipped, "os.system", marker)
    _save_hostile(legacy, "open", marker, legacy=True)
    inspected, converted = _run_all(run_cli, ("inspect", zipped), ("convert", legacy, out))
    assert not marker.exists(), "the payload ran"
    assert not out.exists()
    _assert_refused(inspected, 3, "hostile.pt", SYSTEM)
    _assert_refused(converted, 3, "legacy.pt", "io.open")


# --------------------------------------------------------------------------------------
# evasive pickles, built opcode by opcode: memoised STACK_GLOBAL and decoys
#
# A scanner that names "the last two strings before STACK_GLOBAL" is fooled by strings
# fetched from the memo, moved with DUP/POP or hidden behind decoys. Safety never rests on
# such a scan (torch's weights-only unpickler checks each global as it loads, and refuses
# STACK_GLOBAL outright); these cases prove nothing runs and the refusal names the real
# callable, not the decoy.

MKDIR = f"{os.mkdir.__module__}.mkdir"  # posix.mkdir: harmless, and leaves a trace


def _u(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _evasive(kind: str, marker: Path) -> bytes:
    """A pickle that calls ``posix.mkdir(marker)`` when loaded by a plain unpickler."""
    module, name = MKDIR.split(".")
    arg = _u(str(marker))
    call = arg + b"\x85R"  # (marker,) then REDUCE
    if kind == "memo-strings-from-benign-dict":
        # {"a": "posix", "b": "mkdir"} memoises both names as data; the call fetches them
        return (
            b"\x80\x04}\x94(" + _u("a") + b"\x94" + _u(module) + b"\x94" + _u("b") + b"\x94"
            + _u(name) + b"\x94u" + _u("torch._utils") + b"\x94" + _u("_rebuild_tensor_v2")
            + b"\x94" + b"0" + b"0" + _u("k") + b"h\x02h\x04\x93" + call + b"s."
        )  # fmt: skip
    if kind == "decoy-popped":  # the last two strings pushed are not the two used
        return b"\x80\x04}" + _u("k") + _u(module) + _u("_rebuild_tensor_v2") + b"0" + _u(name) + b"\x93" + call + b"s."  # fmt: skip
    if kind == "dup-module-name":  # module name duplicated, the copy popped later
        return b"\x80\x04}" + _u("k") + _u(module) + b"2" + b"0" + _u(name) + b"\x93" + call + b"s."  # fmt: skip
    if kind == "memoised-callable":  # the global is memoised, dropped, and called much later
        return (
            b"\x80\x04" + _u(module) + _u(name) + b"\x93\x94" + b"0"
            + b"}" + _u("w") + _u("torch") + _u("float32") + b"\x93" + b"s"
            + _u("k") + b"h\x00" + call + b"s."
        )  # fmt: skip
    if kind == "protocol-2-global-memoised":  # GLOBAL, BINPUT, POP; BINGET at the call
        return (
            b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x07" + b"0"
            + b"}X\x01\x00\x00\x00kh\x07" + b"X" + struct.pack("<I", len(str(marker)))
            + str(marker).encode() + b"\x85Rs."
        )  # fmt: skip
    if kind == "nested-loads-memoised":  # pickle.loads(<inner pickle calling posix.mkdir>)
        inner = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + b"X" + struct.pack("<I", len(str(marker))) + str(marker).encode() + b"\x85R."  # fmt: skip
        return (
            b"\x80\x04" + _u("_pickle") + b"\x94" + _u("loads") + b"\x94" + b"00"
            + b"}" + _u("k") + b"h\x00h\x01\x93" + b"C" + bytes([len(inner)]) + inner
            + b"\x85Rs."
        )  # fmt: skip
    raise ValueError(kind)


EVASIVE = [
    "memo-strings-from-benign-dict",
    "decoy-popped",
    "dup-module-name",
    "memoised-callable",
    "protocol-2-global-memoised",
    "nested-loads-memoised",
]


@pytest.mark.parametrize("kind", EVASIVE)
def test_evasive_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """Each payload below really runs under a plain unpickler (so refusing it means
    something): it makes the marker folder."""
    marker = tmp_path / "MARKER"
    pickle.loads(_evasive(kind, marker))
    assert marker.is_dir()


def _zip_with_pickle(path: Path, data_pkl: bytes) -> None:
    """A genuine torch zip checkpoint whose ``data.pkl`` record is replaced."""
    import zipfile

    good = path.with_suffix(".good")
    torch.save(_state(), good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            body = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, body)
    good.unlink()


@pytest.mark.parametrize("container", ["plain-pickle", "torch-zip", "dcp-metadata"])
@pytest.mark.parametrize("kind", EVASIVE)
def test_evasive_payloads_are_refused_naming_the_real_callable(
    tmp_path: Path, kind: str, container: str
) -> None:
    marker = tmp_path / "MARKER"
    payload = _evasive(kind, marker)
    if container == "dcp-metadata":
        path = tmp_path / "dcp"
        path.mkdir()
        (path / ".metadata").write_bytes(payload)
        exc = _open_error(path)
        assert isinstance(exc, UnsafeInputError), (type(exc).__name__, str(exc))
        assert not marker.exists(), "the payload ran"
        return
    path = tmp_path / "evasive.pt"
    if container == "torch-zip":
        _zip_with_pickle(path, payload)
    else:
        path.write_bytes(payload)
    expected = "_pickle.loads" if kind == "nested-loads-memoised" else MKDIR
    exc = _refused(path, UnsafeInputError, expected)
    _refused(path, UnsafeInputError, expected, load=True)
    assert "_rebuild_tensor_v2" not in str(exc), f"named the decoy: {exc}"
    assert f"--allow-global {expected}" not in str(exc), str(exc)
    assert not marker.exists(), "the payload ran"


def test_benign_protocol_4_checkpoint_is_refused_cleanly(tmp_path: Path) -> None:
    """torch.save(pickle_protocol=4) is legitimate, but torch's weights-only unpickler
    reads protocol 2 only: a clear exit 3 that says why, not an internal error."""
    path = tmp_path / "p4.pt"
    torch.save(_state(), path, pickle_protocol=4)
    _refused(path, InputError, "Unsupported operand", "protocol")


def test_cli_evasive_pickle(tmp_path: Path, run_cli: RunCli) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evasive.pt"
    _zip_with_pickle(path, _evasive("memo-strings-from-benign-dict", marker))
    out = tmp_path / "out.safetensors"
    proc = run_cli("convert", path, out)
    assert not marker.exists(), "the payload ran"
    assert not out.exists()
    _assert_refused(proc, 3, "evasive.pt", MKDIR)


def test_old_torch_warning() -> None:
    """torch < 2.10 has CVE-2026-24747 in its weights-only unpickler: warn, name it."""
    from ckptsurgeon._torchcheck import unpickler_warning

    for old in ("2.6.0", "2.9.1+cu128", "1.13.1"):
        message = unpickler_warning(old)
        assert message and "CVE-2026-24747" in message and old in message
    for fixed in ("2.10.0", "2.10.0+cpu", "2.14.1+cu130", "3.0.0", None, "garbage"):
        assert unpickler_warning(fixed) is None, fixed


def test_old_torch_warning_at_cli_start_up(tmp_path: Path, monkeypatch) -> None:
    from ckptsurgeon import _torchcheck

    monkeypatch.setattr(_torchcheck, "installed_torch", lambda: "2.9.1")
    monkeypatch.setattr(_torchcheck, "warned", False)
    proc = _cli("schema")
    assert proc.returncode == 0
    assert "warning: torch 2.9.1 is older than 2.10" in proc.stderr
    assert "CVE-2026-24747" in proc.stderr
    monkeypatch.setattr(_torchcheck, "installed_torch", lambda: "2.10.0")
    assert "warning" not in _cli("schema").stderr


def test_old_torch_warning_from_the_library(tmp_path: Path, monkeypatch) -> None:
    from ckptsurgeon import _torchcheck

    path = tmp_path / "w.pt"
    torch.save(_state(), path)
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    monkeypatch.setattr(_torchcheck, "warned", False)
    with pytest.warns(RuntimeWarning, match="CVE-2026-24747"):
        open_checkpoint(path)


# --------------------------------------------------------------------------------------
# --allow-global


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_namespace_is_refused_then_admitted_by_name(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "with_args.pt"
    torch.save(
        {"state_dict": _state(), "args": argparse.Namespace(lr=0.1)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    exc = _refused(path, UnsafeInputError, "argparse.Namespace")
    assert "--allow-global argparse.Namespace" in str(exc)  # the way out, spelled for the user
    ckpt = open_checkpoint(path, allow_globals=["argparse.Namespace"])
    assert_same_tensors(materialise(ckpt.tensors), _state())
    proc = _cli("inspect", path, "--allow-global", "argparse.Namespace")
    assert proc.returncode == 0, proc.stderr


def test_cli_namespace_admitted_by_name(tmp_path: Path, run_cli: RunCli) -> None:
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": _state(), "args": argparse.Namespace(lr=0.1)}, path)
    proc = run_cli("inspect", path, "--json", "--allow-global", "argparse.Namespace")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert sorted(summary["tensors"]) == ["fc.bias", "fc.weight"]


BLOCKED = [
    "os.system",
    "posix.system",
    "builtins.eval",
    "subprocess.Popen",
    "builtins.open",
    "io.open",
    "pickle.loads",
    "_pickle.loads",
    "shutil.rmtree",
    "importlib.import_module",
    "os.path.join",
    "torch.load",  # not blocked by module, but a function is never a "benign class"
    "torch.serialization.load",
]


@pytest.mark.parametrize("name", BLOCKED)
def test_allow_global_never_admits_code_running_names(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    _save_hostile(path, "os.system", marker)
    _refused(path, UsageError, name, allow=[name])
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("name", ["os.system", "builtins.eval"])
def test_allow_global_is_checked_whatever_the_format(tmp_path: Path, name: str) -> None:
    """A flag value that is always refused is bad usage even where no pickle is read,
    so the same command line does not pass on .safetensors and fail on .pt."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(_state(), path)
    _refused(path, UsageError, name, allow=[name])


def test_cli_allow_global_refused_even_when_named(tmp_path: Path, run_cli: RunCli) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    out = tmp_path / "out.safetensors"
    _save_hostile(path, "os.system", marker)
    proc = run_cli("convert", path, out, "--allow-global", SYSTEM)
    assert not marker.exists(), "the payload ran"
    assert not out.exists()
    _assert_refused(proc, 2, SYSTEM)


# --------------------------------------------------------------------------------------
# empty, truncated and random files


def _zip_bytes(legacy: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save(_state())


def _random(seed: int, n: int = 2048) -> bytes:
    return random.Random(seed).randbytes(n)


CORRUPT: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "empty-pt": ("x.pt", lambda: b"", "empty"),
    "empty-safetensors": ("x.safetensors", lambda: b"", "empty"),
    "empty-no-suffix": ("weights", lambda: b"", "empty"),
    "zip-half": ("x.pt", lambda: (d := _zip_bytes())[: len(d) // 2], "truncated"),
    "zip-header-only": ("x.pt", lambda: _zip_bytes()[:30], "truncated"),
    "legacy-half": ("x.pt", lambda: (d := _zip_bytes(True))[: len(d) // 2], "truncated"),
    "legacy-one-byte": ("x.pt", lambda: _zip_bytes(True)[:1], "x.pt"),
    "safetensors-half": ("x.safetensors", lambda: (d := _safetensors_bytes())[: len(d) // 2], "x.safetensors"),
    "safetensors-4-bytes": ("x.safetensors", lambda: _safetensors_bytes()[:4], "too short"),
    "random-pt": ("x.pt", lambda: _random(0), "x.pt"),
    "random-pt-seed2": ("x.pt", lambda: _random(2, 138), "x.pt"),  # found by the fuzz below
    "random-pickle-proto": ("x.pt", lambda: b"\x80\x02" + _random(1), "x.pt"),
    "random-zip-magic": ("x.pt", lambda: b"PK\x03\x04" + _random(2), "x.pt"),
    "random-bin": ("x.bin", lambda: _random(3), "x.bin"),
    "random-no-suffix": ("weights", lambda: _random(4), "unrecognised"),
    "random-safetensors": ("x.safetensors", lambda: _random(5), "x.safetensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_refused(tmp_path: Path, case: str) -> None:
    name, build, needle = CORRUPT[case]
    path = tmp_path / name
    path.write_bytes(build())
    _refused(path, InputError, needle)


def test_random_bytes_never_escape_as_internal_errors(tmp_path: Path) -> None:
    """A small fuzz: random bytes under every suffix, and every cut of real files."""
    escapes: dict[str, str] = {}
    files = {".pt": _zip_bytes(), ".pth": _zip_bytes(True), ".safetensors": _safetensors_bytes()}
    samples = [(f"r{seed}{sfx}", _random(seed, 64 + seed * 37)) for seed in range(40)
               for sfx in (".pt", ".bin", ".safetensors", "")]  # fmt: skip
    samples += [(f"cut{cut}{sfx}", data[:cut]) for sfx, data in files.items()
                for cut in range(1, len(data), max(1, len(data) // 60))]  # fmt: skip
    for name, data in samples:
        path = tmp_path / name
        path.write_bytes(data)
        try:
            materialise(open_checkpoint(path).tensors)
        except InputError:
            pass
        except Exception as exc:
            escapes.setdefault(f"{type(exc).__name__}: {exc}"[:100], name)
        else:
            escapes.setdefault("accepted", name)
        path.unlink()
    assert not escapes, escapes


def test_cli_random_bytes(tmp_path: Path, run_cli: RunCli) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(_random(2, 138))  # random bytes the fuzz below found escaping
    _assert_refused(run_cli("inspect", noise), 3, "noise.pt")


# --------------------------------------------------------------------------------------
# safetensors headers, built byte by byte


def _st(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length + header (a dict, or raw text/bytes) + data."""
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {"dtype": dtype, "shape": as_list(shape), "data_offsets": as_list(offsets)}


_W = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
_DATA = struct.pack("<2f", 1.0, 2.0)

HEADERS: dict[str, tuple[bytes, str]] = {
    "shorter-than-8-bytes": (b"\x01\x02\x03", "too short"),
    "length-past-end": (_st({"w": _entry()}, _DATA, length=1000), "runs past the end"),
    "length-over-100MB-cap": (_st({"w": _entry()}, _DATA, length=200_000_000), "cap"),
    "length-u64-max": (_st({"w": _entry()}, _DATA, length=2**64 - 1), "cap"),
    "length-zero": (_st(b"", _DATA), "not JSON"),
    "not-utf8": (_st(b'{"w\xff\xfe": 1}'), "UTF-8"),
    "not-json": (_st('{"w": {"dtype": '), "not JSON"),
    "json-array": (_st("[1, 2, 3]"), "not a JSON object"),
    "json-string": (_st('"weights"'), "not a JSON object"),
    "deeply-nested-json": (_st('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}"), "not a valid safetensors file"),
    "huge-integer": (_st('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + "9" * 5000 + "]}}"), "not a valid safetensors file"),
    "duplicate-tensor-name": (_st(f'{{"w": {_W}, "w": {_W}}}', _DATA), "duplicate key 'w'"),
    "duplicate-metadata-key": (_st(f'{{"__metadata__": {{"a": "1", "a": "2"}}, "w": {_W}}}', _DATA), "duplicate key 'a'"),
    "unknown-dtype": (_st({"w": _entry(dtype="F128")}, _DATA), "unknown dtype 'F128'"),
    "lowercase-dtype": (_st({"w": _entry(dtype="f32")}, _DATA), "unknown dtype"),
    "dtype-not-a-string": (_st({"w": _entry(dtype=["F32"])}, _DATA), "dtype"),
    "dtype-object": (_st({"w": _entry(dtype={"F32": 1})}, _DATA), "dtype"),
    "negative-dim": (_st({"w": _entry(shape=[-2])}, _DATA), "shape"),
    "float-dim": (_st({"w": _entry(shape=[2.0])}, _DATA), "shape"),
    "string-dim": (_st({"w": _entry(shape=["2"])}, _DATA), "shape"),
    "bool-dim": (_st({"w": _entry(shape=[True, 2])}, _DATA), "shape"),
    "nested-dim": (_st({"w": _entry(shape=[[2]])}, _DATA), "shape"),
    "shape-not-a-list": (_st({"w": _entry(shape=2)}, _DATA), "shape"),
    "offsets-one-value": (_st({"w": _entry(offsets=[8])}, _DATA), "data_offsets"),
    "offsets-three-values": (_st({"w": _entry(offsets=[0, 4, 8])}, _DATA), "data_offsets"),
    "offsets-begin-after-end": (_st({"w": _entry(shape=[0], offsets=[8, 0])}, _DATA), "data_offsets"),
    "offsets-negative": (_st({"w": _entry(offsets=[-8, 0])}, _DATA), "data_offsets"),
    "offsets-float": (_st({"w": _entry(offsets=[0, 8.0])}, _DATA), "data_offsets"),
    "offsets-nan": (_st('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', _DATA), "data_offsets"),
    "offsets-not-a-list": (_st({"w": _entry(offsets="0:8")}, _DATA), "data_offsets"),
    "offsets-gap": (_st({"a": _entry(shape=[1], offsets=[0, 4]), "b": _entry(shape=[1], offsets=[8, 12])}, bytes(12)), "gap"),
    "offsets-overlap": (_st({"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])}, bytes(12)), "overlap"),
    "offsets-same-span": (_st({"a": _entry(), "b": _entry()}, _DATA), "overlap"),
    "offsets-not-from-zero": (_st({"w": _entry(offsets=[4, 12])}, bytes(12)), "gap at byte 0"),
    "shape-times-dtype-mismatch": (_st({"w": _entry(shape=[3])}, _DATA), "12 bytes"),
    "sub-byte-dtype-not-whole-bytes": (_st({"w": _entry(dtype="F4", shape=[3], offsets=[0, 1])}, b"\0"), "F4"),
    "huge-shape": (_st({"w": _entry(shape=[2**40, 2**40], offsets=[0, 2**82])}, _DATA), "data covers"),
    "data-shorter-than-offsets": (_st({"w": _entry()}, _DATA[:4]), "data covers"),
    "trailing-bytes": (_st({"w": _entry()}, _DATA + b"\0\0\0\0"), "data covers"),
    "metadata-int-value": (_st({"__metadata__": {"format": 1}, "w": _entry()}, _DATA), "__metadata__"),
    "metadata-null-value": (_st({"__metadata__": {"format": None}, "w": _entry()}, _DATA), "__metadata__"),
    "metadata-not-object": (_st({"__metadata__": ["pt"], "w": _entry()}, _DATA), "__metadata__"),
    "entry-extra-field": (_st({"w": {**_entry(), "offset": 0}}, _DATA), "exactly dtype, shape, data_offsets"),
    "entry-missing-field": (_st({"w": {"dtype": "F32", "shape": [2]}}, _DATA), "exactly dtype, shape, data_offsets"),
    "entry-not-object": (_st({"w": [0, 8]}, _DATA), "exactly dtype, shape, data_offsets"),
    "dtype-torch-cannot-hold": (_st({"w": _entry(dtype="F6_E2M3", shape=[4], offsets=[0, 3])}, b"\0\0\0"), "'w'"),
}  # fmt: skip


def test_hand_built_header_is_valid() -> None:
    """The builder above writes what the reference library reads: the bad cases differ
    from a good file only in what they name."""
    from safetensors.torch import load

    good = _st({"__metadata__": {"format": "pt"}, "w": _entry()}, _DATA)
    assert torch.equal(load(good)["w"], torch.tensor([1.0, 2.0]))
    padded = _st('{"w": ' + _W + "}" + " " * 7, _DATA)  # the writer pads with spaces
    assert torch.equal(load(padded)["w"], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("padding", [0, 7])
def test_hand_built_header_is_read(tmp_path: Path, padding: int) -> None:
    path = tmp_path / "good.safetensors"
    path.write_bytes(
        _st('{"__metadata__": {"format": "pt"}, "w": ' + _W + "}" + " " * padding, _DATA)
    )
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"format": "pt"}
    assert torch.equal(ckpt.tensors["w"].load(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("case", list(HEADERS))
def test_bad_safetensors_header_is_refused(tmp_path: Path, case: str) -> None:
    data, needle = HEADERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    _refused(path, InputError, str(path), needle)


def test_bad_header_is_refused_without_the_suffix(tmp_path: Path) -> None:
    """Detection by bytes: a safetensors-looking file named .bin is still checked strictly."""
    path = tmp_path / "weights.bin"
    path.write_bytes(HEADERS["duplicate-tensor-name"][0])
    _refused(path, InputError, "duplicate key 'w'")


def test_cli_bad_safetensors_header(tmp_path: Path, run_cli: RunCli) -> None:
    duplicate = tmp_path / "duplicate.safetensors"
    duplicate.write_bytes(HEADERS["duplicate-tensor-name"][0])
    out = tmp_path / "out.safetensors"
    proc = run_cli("convert", duplicate, out)
    assert not out.exists()
    _assert_refused(proc, 3, "duplicate.safetensors", "duplicate key 'w'")


# --------------------------------------------------------------------------------------
# sharded safetensors folders

INDEX = "model.safetensors.index.json"


def _sharded_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 16, generator=g),
        "b.weight": torch.randn(16, 16, generator=g),
        "c.bias": torch.randn(16, generator=g),
    }


def _sharded(folder: Path) -> dict[str, Any]:
    """A real Hugging Face sharded folder (two shards); returns its index."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(_sharded_state(), folder, max_shard_size=1100)
    index = json.loads((folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2, index
    return index


def _rename_shard(folder: Path, index: dict, old: str, new: str) -> None:
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


def _first_shard(index: dict) -> str:
    return index["weight_map"]["a.weight"]


def _shard_escape_parent(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    shutil.copy(folder / shard, folder.parent / "evil.safetensors")  # exists: not "missing"
    _rename_shard(folder, index, shard, "../evil.safetensors")
    return "not a plain relative name"


def _shard_absolute(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    target = folder.parent / "elsewhere.safetensors"
    shutil.copy(folder / shard, target)
    _rename_shard(folder, index, shard, str(target))
    return "not a plain relative name"


def _shard_backslash(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    _rename_shard(folder, index, shard, "..\\evil.safetensors")
    return "not a plain relative name"


def _shard_backslash_inside(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    (folder / "sub").mkdir()
    shutil.copy(folder / shard, folder / "sub" / shard)
    _rename_shard(folder, index, shard, f"sub\\{shard}")
    return "not a plain relative name"


def _shard_drive(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    shutil.copy(folder / shard, folder / f"C:{shard}")  # a legal POSIX file name
    _rename_shard(folder, index, shard, f"C:{shard}")
    return "not a plain relative name"


def _shard_drive_absolute(folder: Path, index: dict) -> str:
    _rename_shard(folder, index, _first_shard(index), "C:/Windows/evil.safetensors")
    return "not a plain relative name"


def _shard_dot_segment(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    _rename_shard(folder, index, shard, f"./{shard}")
    return "not a plain relative name"


def _shard_wrong_extension(folder: Path, index: dict) -> str:
    shard = _first_shard(index)
    (folder / shard).rename(folder / "model-00001-of-00002.bin")
    _rename_shard(folder, index, shard, "model-00001-of-00002.bin")
    return "does not end with .safetensors"


def _shard_missing(folder: Path, index: dict) -> str:
    (folder / _first_shard(index)).unlink()
    return "missing"


def _weight_map_disagrees(folder: Path, index: dict) -> str:
    other = index["weight_map"]["b.weight"]
    index["weight_map"]["a.weight"] = other  # a.weight really is in the first shard
    (folder / INDEX).write_text(json.dumps(index))
    return "'a.weight'"


def _weight_map_extra_tensor(folder: Path, index: dict) -> str:
    index["weight_map"]["ghost.weight"] = _first_shard(index)
    (folder / INDEX).write_text(json.dumps(index))
    return "'ghost.weight'"


def _weight_map_lacks_tensor(folder: Path, index: dict) -> str:
    del index["weight_map"]["c.bias"]
    (folder / INDEX).write_text(json.dumps(index))
    return "'c.bias'"


def _index_not_json(folder: Path, index: dict) -> str:
    (folder / INDEX).write_text('{"weight_map": {')
    return "JSON"


def _index_deeply_nested(folder: Path, index: dict) -> str:
    (folder / INDEX).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return "JSON"


def _index_without_weight_map(folder: Path, index: dict) -> str:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weights": index["weight_map"]}))
    return "weight_map"


def _index_weight_map_not_strings(folder: Path, index: dict) -> str:
    index["weight_map"]["a.weight"] = ["model-00001-of-00002.safetensors"]
    (folder / INDEX).write_text(json.dumps(index))
    return "weight_map"


def _shard_corrupt(folder: Path, index: dict) -> str:
    path = folder / _first_shard(index)
    path.write_bytes(path.read_bytes()[:-4])
    return "data covers"


SHARD_CASES: dict[str, Callable[[Path, dict], str]] = {
    "dotdot": _shard_escape_parent,
    "absolute": _shard_absolute,
    "backslash-dotdot": _shard_backslash,
    "backslash-inside": _shard_backslash_inside,
    "drive-relative": _shard_drive,
    "drive-absolute": _shard_drive_absolute,
    "dot-segment": _shard_dot_segment,
    "wrong-extension": _shard_wrong_extension,
    "missing-shard": _shard_missing,
    "weight-map-disagrees": _weight_map_disagrees,
    "weight-map-extra-tensor": _weight_map_extra_tensor,
    "weight-map-lacks-tensor": _weight_map_lacks_tensor,
    "index-not-json": _index_not_json,
    "index-deeply-nested": _index_deeply_nested,
    "index-without-weight-map": _index_without_weight_map,
    "index-weight-map-not-strings": _index_weight_map_not_strings,
    "corrupt-shard": _shard_corrupt,
}


@pytest.mark.parametrize("via", ["folder", "index"])
@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_sharded_folder_is_refused(tmp_path: Path, case: str, via: str) -> None:
    folder = tmp_path / "model"
    needle = SHARD_CASES[case](folder, _sharded(folder))
    _refused(folder if via == "folder" else folder / INDEX, InputError, needle)


def test_valid_sharded_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _sharded(folder)
    for path in (folder, folder / INDEX):
        ckpt = open_checkpoint(path)
        assert ckpt.format == "safetensors-sharded"
        assert_same_tensors(materialise(ckpt.tensors), _sharded_state())


def _hf_cache_layout(root: Path) -> Path:
    """Snapshot files that are relative links to content-addressed blobs, as in the
    Hugging Face cache (``snapshots/<rev>/x -> ../../blobs/<hash>``)."""
    staging = root / "staging"
    _sharded(staging)
    blobs = root / "blobs"
    snapshot = root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, item in enumerate(sorted(staging.iterdir())):
        blob = blobs / f"{i:02d}{'e' * 38}"
        item.rename(blob)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    return snapshot


def test_symlinked_shards_load(tmp_path: Path) -> None:
    snapshot = _hf_cache_layout(tmp_path / "cache")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    for path in (snapshot, snapshot / INDEX):
        ckpt = open_checkpoint(path)
        assert_same_tensors(materialise(ckpt.tensors), _sharded_state())


def test_cli_sharded_folders(tmp_path: Path, run_cli: RunCli) -> None:
    evil = tmp_path / "evil_model"
    _shard_escape_parent(evil, _sharded(evil))
    snapshot = _hf_cache_layout(tmp_path / "cache")
    out_evil = tmp_path / "out_evil.safetensors"
    out_ok = tmp_path / "out_ok.safetensors"
    refused, converted = _run_all(
        run_cli, ("convert", evil, out_evil), ("convert", snapshot, out_ok)
    )
    _assert_refused(refused, 3, "../evil.safetensors", "not a plain relative name")
    assert not out_evil.exists()
    assert converted.returncode == 0, converted.stderr
    assert "Traceback" not in converted.stderr
    assert_same_tensors(materialise(open_checkpoint(out_ok).tensors), _sharded_state())


# --------------------------------------------------------------------------------------
# torch.distributed.checkpoint folders


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _dcp_metadata_calling(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL(module, name)(arg). A dotted ``name`` is looked up
    attribute by attribute (``os.mkdir`` inside the DCP metadata module is os.mkdir)."""
    return (
        b"\x80\x04" + _binunicode(module) + _binunicode(name) + b"\x93"
        + _binunicode(arg) + b"\x85" + b"R."
    )  # fmt: skip


DCP_META = "torch.distributed.checkpoint.metadata"
DCP_PAYLOADS = {
    "dotted-os-in-metadata-module": (DCP_META, "os.mkdir"),
    "dotted-torch-os-in-metadata-module": (DCP_META, "torch.os.mkdir"),
    "dotted-torch-load-in-metadata-module": (DCP_META, "torch.load"),
    "posix.mkdir": (os.mkdir.__module__, "mkdir"),
    "builtins.eval": ("builtins", "eval"),
}


@pytest.mark.parametrize("case", list(DCP_PAYLOADS))
def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path, case: str) -> None:
    module, name = DCP_PAYLOADS[case]
    marker = tmp_path / "MARKER"
    folder = tmp_path / "dcp"
    folder.mkdir()
    arg = f"open({str(marker)!r}, 'w')" if name == "eval" else str(marker)
    (folder / ".metadata").write_bytes(_dcp_metadata_calling(module, name, arg))
    exc = _open_error(folder)
    assert not marker.exists(), "the DCP metadata payload ran"
    assert isinstance(exc, UnsafeInputError), (type(exc).__name__, str(exc))
    assert name in str(exc), str(exc)


def test_dcp_chunk_path_outside_the_folder_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():  # "no process group": a single-process save
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(folder))
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    for info in metadata.storage_data.values():
        (folder / info.relative_path).rename(outside / "stolen.distcp")
        info.relative_path = "../outside/stolen.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    exc = _open_error(folder, load=True)
    assert isinstance(exc, InputError)
    assert "../outside/stolen.distcp" in str(exc), str(exc)


def test_cli_dcp_metadata_payload(tmp_path: Path, run_cli: RunCli) -> None:
    marker = tmp_path / "MARKER"
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(_dcp_metadata_calling(DCP_META, "os.mkdir", str(marker)))
    proc = run_cli("inspect", folder)
    assert not marker.exists(), "the DCP metadata payload ran"
    _assert_refused(proc, 3, "os.mkdir")


def test_an_unreadable_input_is_exit_3(tmp_path: Path, monkeypatch) -> None:
    """A permission error while finding the checkpoint is bad input, not an internal error."""
    from ckptsurgeon.formats import index

    folder = tmp_path / "locked"
    folder.mkdir()

    def denied(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(index.os, "listdir", denied)
    with pytest.raises(InputError, match="locked: cannot read: Permission denied"):
        open_checkpoint(folder)


def test_whole_pickled_modules_give_their_state_dict(tmp_path: Path) -> None:
    """``torch.save(model)`` needs its classes admitted; then it reads as its state dict."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    admitted = [
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.batchnorm.BatchNorm1d",
    ]
    torch.save(model, tmp_path / "whole.pt")
    torch.save({"model": model, "epoch": 3}, tmp_path / "inside.pt")
    for name in ("whole.pt", "inside.pt"):
        with pytest.raises(UnsafeInputError, match=r"--allow-global torch\.nn\.modules\.linear"):
            open_checkpoint(tmp_path / name)
        ckpt = open_checkpoint(tmp_path / name, allow_globals=admitted)
        assert_same_tensors(materialise(ckpt.tensors), model.state_dict())


def test_a_pickle_with_no_tensors_names_the_file(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(InputError, match=r"empty\.pt: no tensors found \(a pickled dict"):
        open_checkpoint(tmp_path / "empty.pt")


def test_sparse_buffers_read_as_dense(tmp_path: Path, run_cli: RunCli) -> None:
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    torch.save(
        {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "w": dense}, tmp_path / "s.pt"
    )
    ckpt = open_checkpoint(tmp_path / "s.pt")
    assert "2 sparse tensors read as dense" in ckpt.note
    assert all(torch.equal(ref.load(), dense) for ref in ckpt.tensors.values())
    proc = run_cli("convert", tmp_path / "s.pt", tmp_path / "s.safetensors")
    assert proc.returncode == 0, proc.stderr


def test_a_dtype_safetensors_cannot_hold_is_a_usage_error(tmp_path: Path, run_cli: RunCli) -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"q": q}, tmp_path / "q.pt")
    proc = run_cli("convert", tmp_path / "q.pt", tmp_path / "q.safetensors")
    assert_clean_failure(proc, 2, "cannot be stored in safetensors; write a .pt output")
    assert not (tmp_path / "q.safetensors").exists()


def test_numpy_values_and_paths_load_once_admitted(tmp_path: Path) -> None:
    """What torch's docs admit for such checkpoints (numpy rebuilders, dtype classes, paths)
    can be admitted here too, each refusal naming the next global to admit."""
    import numpy as np

    weights = {"w": torch.ones(2)}
    extras = {"best_acc": np.float64(0.5), "log_dir": Path("/runs/1")}
    torch.save({"state_dict": weights, **extras}, tmp_path / "np.pt")
    admitted: list[str] = []
    for _ in range(8):
        try:
            ckpt = open_checkpoint(tmp_path / "np.pt", allow_globals=admitted)
            break
        except UnsafeInputError as exc:
            advice = str(exc).split("pass ", 1)[1].split()
            admitted += [advice[i + 1] for i, word in enumerate(advice) if word == "--allow-global"]
    else:
        pytest.fail(f"still refused after admitting {admitted}")
    assert "numpy._core.multiarray.scalar" in admitted
    assert "pathlib.PosixPath" in admitted
    assert_same_tensors(materialise(ckpt.tensors), weights)


@pytest.mark.parametrize("name", ["numpy.load", "torch.load", "numpy.save", "os.system"])
def test_functions_are_never_admitted(name: str) -> None:
    with pytest.raises(UsageError, match=r"never admitted|only classes can be admitted"):
        open_checkpoint("unused.pt", allow_globals=[name])
