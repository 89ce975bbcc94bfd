"""Where a path written by a user points: one rule for rules files and the command line.

A path in a rules file resolves against that file's folder; a path given on the command
line (or to the Python API) resolves against the working directory. ``~`` is expanded
either way. Nothing here touches the disk beyond ``realpath``.

An ``hf://org/name[@revision]`` name (a model in the Hugging Face cache, see
:mod:`ckptsurgeon.formats.hub`) is not a path: it is left as it is, wherever it is written.
"""

from __future__ import annotations

import os

HF_PREFIX = "hf://"


def is_hf(path: str | os.PathLike[str]) -> bool:
    """Is ``path`` an ``hf://`` name rather than a file system path?"""
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def resolve(path: str | os.PathLike[str], base_dir: str | None = None) -> str:
    """``path`` made absolute: ``~`` expanded, then a relative path joined to ``base_dir``
    (the rules file's folder), or to the working directory when ``base_dir`` is None.
    An ``hf://`` name is returned unchanged."""
    path = os.fspath(path)
    if is_hf(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base_dir if base_dir is not None else os.getcwd(), path))


def rules_folder(rules_path: str | os.PathLike[str]) -> str:
    """The folder a rules file's relative paths resolve against."""
    return os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(rules_path))))


def within(child: str, parent: str) -> bool:
    """Is ``child`` ``parent`` itself or inside it? Both are taken as given (pass real paths
    to compare what the file system will touch)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)
