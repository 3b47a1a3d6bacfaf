"""A host's cores shared by the worker processes on it, the way make's jobserver shares job slots.

Each core is a lock file; a task takes locks for the threads it computes with and holds them
until it ends. Workers on one host then never run more threads than there are cores (processes
that each spin every core slow each other far beyond their share), and a task that runs while the
other workers are idle, such as a batch's solve, which follows once every capture shard is done,
takes the cores they leave instead of its share alone. `flock` locks go with their process: a
worker that is killed frees its cores.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from qfedit.config import Settings

log = logging.getLogger(__name__)


def host_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a `taskset` limit)."""
    return len(os.sched_getaffinity(0))


def default_folder() -> Path:
    # Host-local and per user: the workers of one account on one host share it.
    return Path(tempfile.gettempdir()) / f"qfedit-cpu-{os.getuid()}"


def host_tokens(settings: Settings) -> CpuTokens | None:
    """The cores a worker shares, or None: not on a GPU device, where a task holding every core
    would keep the other GPUs' workers waiting, nor with `cpu_tokens` off. Raises `OSError` when
    the folder cannot be made."""
    if not (settings.cpu_tokens and settings.device == "cpu"):
        return None
    return CpuTokens(settings.cpu_tokens_dir or default_folder())


class CpuTokens:
    """One lock file per core in `folder`."""

    def __init__(self, folder: Path, cores: int | None = None, poll_s: float = 0.05) -> None:
        self.folder = folder
        self.cores = cores or host_cores()
        self.poll_s = poll_s
        folder.mkdir(parents=True, exist_ok=True)

    def _take(self, index: int) -> int | None:
        fd = os.open(self.folder / f"core-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _sweep(self, wanted: int, held: list[int]) -> None:
        for index in range(self.cores):
            if len(held) >= wanted:
                return
            fd = self._take(index)
            if fd is not None:
                held.append(fd)

    def free(self) -> int:
        """How many cores no task holds now."""
        held: list[int] = []
        self._sweep(self.cores, held)
        for fd in held:
            os.close(fd)
        return len(held)

    @contextmanager
    def hold(self, at_least: int, at_most: int | None = None) -> Iterator[int]:
        """Hold `at_least` cores (waiting until that many are free at once), and any further free
        ones up to `at_most`; yields how many are held. Both are capped at the host's cores."""
        at_least = max(1, min(at_least, self.cores))
        at_most = max(at_least, min(at_most or at_least, self.cores))
        held: list[int] = []
        waited, told = 0.0, 0.0
        try:
            while True:
                self._sweep(at_least, held)
                if len(held) >= at_least:
                    break
                # All or none: two tasks that each hold part of what they wait for would wait forever.
                for fd in held:
                    os.close(fd)
                held.clear()
                pause = self.poll_s * (1 + random.random())
                time.sleep(pause)
                waited += pause
                if waited - told >= 60:
                    told = waited
                    log.warning(
                        "waiting %.0f s for %d free cores (held by other qfedit tasks, %s)",
                        waited,
                        at_least,
                        self.folder,
                    )
            if waited:
                log.info("waited %.1f s for %d free cores", waited, at_least)
            self._sweep(at_most, held)
            yield len(held)
        finally:
            for fd in held:
                os.close(fd)  # closing the descriptor releases its lock


@contextmanager
def torch_threads(tokens: CpuTokens | None, share: int | None, borrow: bool = False) -> Iterator[int]:
    """Run torch on the cores held: `share` of them at least (unset: every core), with `borrow`
    also the free ones. Without tokens, torch runs on `share` threads, or as it is set."""
    import torch

    before = torch.get_num_threads()
    with ExitStack() as stack:
        if tokens is None:
            threads = share or before
        else:
            wanted = share or tokens.cores
            threads = stack.enter_context(tokens.hold(wanted, tokens.cores if borrow else wanted))
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)
