"""A rules file's named ``sources:`` as the ops see them: each opened when first asked for.

``take`` and ``average`` read other checkpoints beside the source. Opening one costs what
opening the source does (a pickle is unpickled whole), so a source no op reaches is never
opened, and one that is the source itself (the same file, container and classes: a
Stable Diffusion ``.ckpt`` whose EMA copy sits beside its weights) reuses the source's
table instead of reading the file twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ckptsurgeon.errors import CkptSurgeonError
from ckptsurgeon.formats.reader import Checkpoint, open_checkpoint
from ckptsurgeon.formats.sd_ema import undotted
from ckptsurgeon.formats.table import Table
from ckptsurgeon.rules.config import SourceSpec
from ckptsurgeon.rules.document import NamedSource


class OpenedSources(Mapping[str, Table]):
    """Name -> lazy table of each named source (paths already resolved), opened on first
    use. ``main`` is the source already open, with the spec it was opened from."""

    def __init__(
        self,
        specs: Mapping[str, NamedSource],
        main: tuple[SourceSpec, Checkpoint] | None = None,
    ) -> None:
        self._specs = dict(specs)
        self._main = main
        self._opened: dict[str, Table] = {}

    def __getitem__(self, name: str) -> Table:
        if name not in self._opened:
            self._opened[name] = self._open(name, self._specs[name])
        return self._opened[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def _open(self, name: str, spec: NamedSource) -> Table:
        """Open one source; its errors keep their kind (exit code) and name it."""
        try:
            table = self._same_as_main(spec)
            if table is None:
                table = open_checkpoint(spec.path, spec.key, spec.allow_globals).tensors
            if spec.dotless is not None:
                table = undotted(table, spec.dotless, spec.path)
        except CkptSurgeonError as exc:
            exc.args = (f"sources.{name}: {exc}", *exc.args[1:])
            raise
        return table

    def _same_as_main(self, spec: NamedSource) -> Table | None:
        """The source's own table, when ``spec`` reads exactly what the source read."""
        if self._main is None:
            return None
        main_spec, ckpt = self._main
        same = (spec.path, spec.key, sorted(spec.allow_globals)) == (
            main_spec.path,
            main_spec.key,
            sorted(main_spec.allow_globals),
        )
        return ckpt.tensors if same else None
