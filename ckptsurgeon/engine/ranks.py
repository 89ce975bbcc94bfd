"""One writer under ``torchrun``: rank 0 converts and writes, the other ranks wait for it.

``torchrun`` starts the same command on every rank; SPEC has ``apply`` and ``convert`` write
on rank 0 only, the other ranks then go on (to the fine-tune, when there is one). In
:func:`rank_zero_first` rank 0 runs the block and the others skip it and wait for a message
from rank 0, which carries rank 0's result, or the exit code it failed with. So a failure on
rank 0 fails every rank at once, with the same exit code, and every rank ends the step
holding the same result (the report, what was written). Rank 0 leaves once every rank has
read it.

Why a message rather than waiting for the output to appear: an output from an earlier run
may already be there (a re-run replaces it, ``--skip-up-to-date`` keeps it), so its presence
says nothing about this run; a failure writes nothing, so a waiting rank could only learn of
it from a timeout; and a file cannot carry the report. A rank 0 that dies outright (killed,
out of memory) ends the wait with an error (its connection closes) or torchrun stops the
remaining workers.

The message goes through the rendezvous store torchrun provides (``env://``), under keys of
its own, when there is no process group yet: no group is created, so the fine-tune runner
then starts the job's first one (NCCL on CUDA), never a re-created default group, whose
store keys would collide with the first one's. When the caller already has a group, it goes
through a gloo subgroup of it, destroyed after. No torch import until it is needed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from ckptsurgeon.errors import INTERNAL_ERROR, CkptSurgeonError

# How long the other ranks wait for rank 0's conversion; generous, because a large
# checkpoint takes a while and a rank 0 that dies ends the wait sooner (see above).
WAIT = timedelta(hours=12)
INTERRUPTED = 130


@dataclass(frozen=True)
class Launch:
    """This process's place among the ranks ``torchrun`` started (from its environment)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch() -> Launch:
    """``RANK`` and ``WORLD_SIZE`` as torchrun sets them; one rank when they are absent."""
    try:
        return Launch(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return Launch()


class RankZeroFailed(CkptSurgeonError):
    """Raised on the other ranks when rank 0 failed; exits with rank 0's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Gate:
    """What :func:`rank_zero_first` yields: ``writes`` says whether this rank runs the
    block; rank 0 sets ``result`` in it, and every rank holds that result after it."""

    writes: bool
    result: Any = None


_gates = 0  # gates entered by this process, counted alike on every rank: each has its own keys


@contextlib.contextmanager
def rank_zero_first() -> Iterator[Gate]:
    """Run the block on rank 0 only; on leaving it, the other ranks receive rank 0's
    ``result``, or raise :class:`RankZeroFailed` with the exit code rank 0 failed with.

    Outside torchrun (one rank) the block simply runs. Gates do not nest: each command has
    one (``Job.run``'s, ``convert``'s). A failure on rank 0 is re-raised there after the
    other ranks have been told.
    """
    global _gates
    here = launch()
    if here.world <= 1:
        yield Gate(True)
        return
    _gates += 1
    gate = Gate(here.main)
    with _channel(here, _gates) as channel:
        if not here.main:
            yield gate
            code, message, payload = channel.receive()
            if code != 0:
                raise RankZeroFailed(f"rank 0 failed (exit {code}): {message}", code)
            gate.result = pickle.loads(payload)
            return
        try:
            yield gate
        except BaseException as exc:
            channel.send(_exit_code(exc) or 1, _first_line(exc), b"")
            raise
        try:
            payload = pickle.dumps(gate.result)
        except Exception as exc:  # told to the others before it surfaces here
            channel.send(INTERNAL_ERROR, f"the result does not pickle: {exc}", b"")
            raise
        channel.send(0, "", payload)


P = ParamSpec("P")
R = TypeVar("R")


def on_rank_zero(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run in :func:`rank_zero_first`: on rank 0 only, and every rank returns rank
    0's result (or fails with its exit code). What ``apply`` and ``convert`` write with."""

    @functools.wraps(fn)
    def gated(*args: P.args, **kwargs: P.kwargs) -> R:
        with rank_zero_first() as gate:
            if gate.writes:
                gate.result = fn(*args, **kwargs)
        return gate.result

    return gated


Message = tuple[int, str, bytes]  # exit code, first line of the error, pickled result


class _StoreChannel:
    """Rank 0's message through the rendezvous store; rank 0 waits until all have read it
    (where rank 0 hosts the store, leaving earlier would take it away)."""

    def __init__(self, store: Any, here: Launch) -> None:
        self._store = store
        self._here = here

    def send(self, code: int, message: str, payload: bytes) -> None:
        self._store.set("message", pickle.dumps((code, message, payload)))
        self._store.wait([f"read/{r}" for r in range(1, self._here.world)], WAIT)

    def receive(self) -> Message:
        self._store.wait(["message"], WAIT)
        code, message, payload = pickle.loads(self._store.get("message"))
        self._store.set(f"read/{self._here.rank}", b"1")
        return code, message, payload


class _GroupChannel:
    """Rank 0's message as a broadcast over a gloo group."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def send(self, code: int, message: str, payload: bytes) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([code, message, payload], src=0, group=self._group)

    def receive(self) -> Message:
        import torch.distributed as dist

        box: list[Any] = [None, None, None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return int(box[0]), str(box[1]), bytes(box[2])


@contextlib.contextmanager
def _channel(here: Launch, gate: int) -> Iterator[_StoreChannel | _GroupChannel]:
    """The way rank 0's message travels: the rendezvous store when there is no process
    group (keys under ``ckptsurgeon/gate<n>/``), else a gloo subgroup of the caller's."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CkptSurgeonError("run under torchrun, but this torch has no torch.distributed")
    if dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=WAIT)
        try:
            yield _GroupChannel(group)
        finally:
            dist.destroy_process_group(group)
        return
    store, _, _ = next(
        dist.rendezvous("env://", rank=here.rank, world_size=here.world, timeout=WAIT)
    )
    yield _StoreChannel(dist.PrefixStore(f"ckptsurgeon/gate{gate}", store), here)
    del store  # rank 0 may host it; the fine-tune's group starts its own


def _exit_code(exc: BaseException) -> int:
    """The exit code the CLI gives ``exc`` (SPEC's table)."""
    if isinstance(exc, CkptSurgeonError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return INTERNAL_ERROR


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
