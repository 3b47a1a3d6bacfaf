"""The host's cores as lock files: never more held than there are, borrowed when free, freed
when their process dies, and no two waiters stuck on each other's half."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from qfedit.cpu import CpuTokens, torch_threads


def test_a_task_takes_its_share_and_borrows_only_free_cores(tmp_path: Path) -> None:
    tokens = CpuTokens(tmp_path, cores=4)
    with tokens.hold(1) as first:
        assert (first, tokens.free()) == (1, 3)
        with tokens.hold(1, 4) as borrower:
            assert (borrower, tokens.free()) == (3, 0)  # one core is the first task's
    assert tokens.free() == 4
    with tokens.hold(1, 4) as alone:
        assert alone == 4


def test_a_task_that_wants_more_than_is_free_waits_instead_of_oversubscribing(tmp_path: Path) -> None:
    tokens = CpuTokens(tmp_path, cores=2, poll_s=0.01)
    held: list[int] = []

    def other() -> None:
        with tokens.hold(2) as count:
            held.append(count)

    with tokens.hold(5) as count:
        assert count == 2  # capped at the host's cores
        waiter = threading.Thread(target=other)
        waiter.start()
        time.sleep(0.3)
        assert held == []
    waiter.join(timeout=10)
    assert held == [2]


def test_the_cores_of_a_killed_process_are_free_again(tmp_path: Path) -> None:
    script = (
        "import time; from pathlib import Path; from qfedit.cpu import CpuTokens\n"
        f"with CpuTokens(Path({str(tmp_path)!r}), cores=2).hold(2):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tokens = CpuTokens(tmp_path, cores=2)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert tokens.free() == 0
    finally:
        child.kill()
        child.wait()
    assert tokens.free() == 2


def test_two_tasks_that_each_want_every_core_both_finish(tmp_path: Path) -> None:
    tokens = CpuTokens(tmp_path, cores=2, poll_s=0.005)
    done: list[int] = []

    def task(name: int) -> None:
        for _ in range(20):
            with tokens.hold(2):
                time.sleep(0.001)
        done.append(name)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(done) == [0, 1]


def test_torch_runs_on_the_cores_held_and_gets_its_threads_back(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    tokens = CpuTokens(tmp_path, cores=2)
    with tokens.hold(1), torch_threads(tokens, share=1, borrow=True) as threads:
        assert threads == torch.get_num_threads() == 1
    with torch_threads(tokens, share=1, borrow=True) as threads:
        assert threads == torch.get_num_threads() == 2
    with torch_threads(tokens, share=1) as threads:
        assert threads == torch.get_num_threads() == 1
    with torch_threads(None, share=1) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
