"""A host's cores shared by the worker processes on it, the way make's jobserver shares job slots.

Each core is a lock file; a task takes locks for the threads it computes with and holds them
until it ends. Workers on one host then never run more threads than there are cores (processes
that each spin every core slow each other far beyond their share), and a task that runs while the
other workers are idle, such as a batch's solve, which follows once every capture shard is done,
takes the cores they leave instead of its share alone. `flock` locks go with their process: a
worker that is killed frees its cores.

The folder belongs to one deployment (`cpu-tokens` in its data folder, or `cpu_tokens_dir`): one
in a shared temporary folder let another user plant links in it or hold every core, and made
unrelated installations wait for each other's tasks. It is made 0700 and refused when another user
owns it or others may write to it; its files are opened relative to the folder checked, never
through a symbolic link.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from qfedit.config import Settings
from qfedit.errors import InvalidInputError

log = logging.getLogger(__name__)


def host_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a `taskset` limit)."""
    return len(os.sched_getaffinity(0))


class UnsafeFolderError(InvalidInputError, PermissionError):
    """The folder of the shared cores is not this user's alone: its path and why are the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="cpu_tokens_dir")


def tokens_folder(settings: Settings) -> Path:
    """The folder of this deployment's cores: `cpu_tokens_dir`, or `cpu-tokens` in the data folder."""
    return settings.cpu_tokens_dir or settings.data_dir / "cpu-tokens"


def host_tokens(settings: Settings) -> CpuTokens | None:
    """The cores a worker shares, or None: not on a GPU device, where a task holding every core
    would keep the other GPUs' workers waiting, nor with `cpu_tokens` off. Raises `OSError` when
    the folder cannot be made, `UnsafeFolderError` (one) when it is not this user's alone."""
    if not (settings.cpu_tokens and settings.device == "cpu"):
        return None
    return CpuTokens(tokens_folder(settings))


def _private_folder(folder: Path) -> int:
    """A descriptor of `folder`, made 0700 if missing; refused unless it is a directory (not a
    link to one) that this user owns and no one else may write to."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):  # checked below, whoever made it
        folder.mkdir(mode=0o700)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if os.path.islink(folder):
            raise UnsafeFolderError(
                f"the folder of the shared cores {folder} is a symbolic link; name the real folder "
                "(QFEDIT_CPU_TOKENS_DIR)"
            ) from err
        raise
    # Checked on the descriptor the lock files are opened through: a swap of the path after the
    # check changes nothing.
    info = os.fstat(fd)
    reason = None
    if info.st_uid != os.geteuid():
        reason = f"it belongs to user {info.st_uid}, not to this user ({os.geteuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        reason = f"others may write to it (mode {stat.S_IMODE(info.st_mode):04o})"
    if reason is not None:
        os.close(fd)
        raise UnsafeFolderError(
            f"refusing the folder of the shared cores {folder}: {reason}; another user could hold every "
            "core or plant links in it. Use a folder of this deployment's own, mode 0700 "
            "(QFEDIT_CPU_TOKENS_DIR; unset: cpu-tokens in the data folder)"
        )
    return fd


WaitReport = Callable[[float | None], None]
"""Told how long a task has waited for cores, while it waits (every `REPORT_EVERY_S` from
`REPORT_AFTER_S`), and None once it holds them; only if it was told a wait before."""
REPORT_AFTER_S = 1.0
REPORT_EVERY_S = 15.0


class CpuTokens:
    """One lock file per core in `folder`."""

    def __init__(self, folder: Path, cores: int | None = None, poll_s: float = 0.05) -> None:
        self.folder = folder
        self.cores = cores or host_cores()
        self.poll_s = poll_s
        self._folder_fd = _private_folder(folder)

    def __del__(self) -> None:
        fd = getattr(self, "_folder_fd", None)
        if fd is not None:
            os.close(fd)

    def _take(self, index: int) -> int | None:
        # Relative to the folder checked, and never through a link: a planted `core-0.lock` pointing
        # at another file does not make this process create or lock that file.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(f"core-{index}.lock", flags, 0o600, dir_fd=self._folder_fd)
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
    def hold(
        self, at_least: int, at_most: int | None = None, waiting: WaitReport | None = None
    ) -> Iterator[int]:
        """Hold `at_least` cores (waiting until that many are free at once), and any further free
        ones up to `at_most`; yields how many are held. Both are capped at the host's cores.
        `waiting` hears of a wait longer than `REPORT_AFTER_S` (see `WaitReport`)."""
        at_least = max(1, min(at_least, self.cores))
        at_most = max(at_least, min(at_most or at_least, self.cores))
        held: list[int] = []
        waited, logged, reported = 0.0, 0.0, None
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
                if waited - logged >= 60:
                    logged = waited
                    log.warning(
                        "waiting %.0f s for %d free cores (held by other qfedit tasks, %s)",
                        waited,
                        at_least,
                        self.folder,
                    )
                due = REPORT_AFTER_S if reported is None else reported + REPORT_EVERY_S
                if waiting is not None and waited >= due:
                    reported = waited
                    waiting(waited)
            if waited:
                log.info("waited %.1f s for %d free cores", waited, at_least)
            if waiting is not None and reported is not None:
                waiting(None)
            self._sweep(at_most, held)
            yield len(held)
        finally:
            for fd in held:
                os.close(fd)  # closing the descriptor releases its lock


@contextmanager
def torch_threads(
    tokens: CpuTokens | None, share: int | None, borrow: bool = False, waiting: WaitReport | None = None
) -> Iterator[int]:
    """Run torch on the cores held: `share` of them at least (unset: every core), with `borrow`
    also the free ones; `waiting` hears of a wait for them. Without tokens, torch runs on `share`
    threads, or as it is set."""
    import torch

    before = torch.get_num_threads()
    with ExitStack() as stack:
        if tokens is None:
            threads = share or before
        else:
            wanted = share or tokens.cores
            threads = stack.enter_context(tokens.hold(wanted, tokens.cores if borrow else wanted, waiting))
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)
