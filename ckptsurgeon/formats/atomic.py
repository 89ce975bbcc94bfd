"""Atomic, durable replacement of one output path (a file or a folder), without torch.

A write goes to a temporary sibling of the output, is fsynced, then renamed into place, so
the output path only ever holds a complete result: the old one or the new one. A folder
replaces an older folder with one atomic exchange (``renameat2(RENAME_EXCHANGE)``) where
the kernel offers it. Temporaries are named after the writing process, so the next write to
the same output removes those a killed run left behind. No torch import: the report and
the fine-tune state use it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
from collections.abc import Iterator

from ckptsurgeon.errors import UsageError
from ckptsurgeon.formats.hf_folder import is_output_file, is_weight_file, written_by_ckptsurgeon
from ckptsurgeon.paths import within

TMP_MARK = ".ckptsurgeon-tmp-"


def _no_sync(path: str) -> None:
    pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(final: str) -> list[str]:
    """Remove our temporaries for ``final`` left by runs that were killed.

    A run killed half-way through the two-rename fallback (no atomic exchange) may have
    moved the previous output aside (``...-old``) without putting the new one in place;
    that previous output is restored first, then every stale temporary is removed.
    """
    parent, base = os.path.split(os.path.abspath(final))
    removed = []
    prefix = f".{base}{TMP_MARK}"
    try:
        names = sorted(os.listdir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    stale = []
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.append(os.path.join(parent, name))
    final = os.path.join(parent, base)
    for full in stale:
        if full.endswith(_OLD) and not os.path.lexists(final):
            # The previous output, back where it was; if that fails, leave it for a person
            # rather than delete the only copy.
            with contextlib.suppress(OSError):
                os.rename(full, final)
            continue
        _remove(full)
        removed.append(full)
    return removed


_OLD = "-old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str, b: str) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (Linux ``renameat2``
    with ``RENAME_EXCHANGE``). False, with nothing changed, where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def check_replaceable(final: str, *, is_dir: bool) -> None:
    """UsageError unless writing to ``final`` replaces nothing but an earlier output of the
    same kind: a folder output swaps the whole folder, so a folder holding anything else
    (notes, or a model's config.json and tokenizer that ckptsurgeon did not write beside
    its weights) is refused rather than lost."""
    if os.path.isdir(final):
        if not is_dir:
            raise UsageError(f"output {final} is an existing folder; give a file path")
        ours = written_by_ckptsurgeon(final)
        others = sorted(
            n for n in os.listdir(final) if not (is_weight_file(n) or (ours and is_output_file(n)))
        )
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UsageError(
                f"output {final} is an existing folder holding other files ({shown}); a "
                "folder output replaces the whole folder, so give a new folder (and copy "
                "what else it needs beside the weights), or empty this one"
            )
    elif is_dir and os.path.lexists(final):
        raise UsageError(
            f"output {final} is an existing file; a path with no suffix names a folder output"
        )


def _makedirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the folders it created, outermost first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
            continue
        created.append(folder)
    return created


@contextlib.contextmanager
def atomic_path(final: str, *, is_dir: bool, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``final``; on success move it into place atomically,
    on any failure remove it (and any folder made for it), leaving ``final`` as it was.
    ``durable`` also fsyncs the folders around the rename."""
    sync_dir = _fsync_dir if durable else _no_sync
    final = os.path.abspath(final)
    parent, base = os.path.split(final)
    created = _makedirs(parent)
    tmp = os.path.join(parent, f".{base}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        clean_stale_temporaries(final)
        check_replaceable(final, is_dir=is_dir)
        if is_dir:
            os.mkdir(tmp)
        yield tmp
        if is_dir:
            sync_dir(tmp)
        if is_dir and os.path.lexists(final):
            if exchange(tmp, final):  # final is the new folder; tmp now holds the old one
                sync_dir(parent)
                _remove(tmp)
            else:
                old = f"{tmp}{_OLD}"
                os.rename(final, old)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old, final)
                    raise
                sync_dir(parent)
                _remove(old)
        else:
            os.replace(tmp, final)
        sync_dir(parent)
    except BaseException:
        _remove(tmp)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def refuse_overwriting_inputs(output: str, inputs: list[str], what: str = "output") -> None:
    """UsageError when writing ``output`` could damage any of the ``inputs`` paths.

    Writing to an input, into an input folder, or replacing a folder that holds an input
    are all refused; paths are compared after resolving links (so a link to the source, or
    the blob a Hugging Face cache snapshot links to, counts as the source).
    """
    out = os.path.realpath(output)
    for item in inputs:
        real = os.path.realpath(item)
        if within(out, real) or within(real, out):
            raise UsageError(
                f"{what} {output} would overwrite the input {item}; "
                "choose a path outside the source"
            )
