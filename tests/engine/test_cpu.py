"""The host's cores as lock files: never more held than there are, borrowed when free, freed
when their process dies, and no two waiters stuck on each other's half; in a folder of the
deployment's own that no one else can write to, whose waits are told."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from qfedit.config import Settings
from qfedit.cpu import REPORT_AFTER_S, CpuTokens, UnsafeFolderError, host_tokens, torch_threads


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


def _someone_elses_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        folder = tmp_path / "planted"
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)  # nobody
        return folder
    return Path("/")  # root's


def test_the_folder_is_the_deployments_own_not_a_predictable_one_in_tmp(tmp_path: Path) -> None:
    # The attack: `$TMPDIR/qfedit-cpu-$UID` was shared by every checkout of one user, so another
    # installation's workers held the cores a newcomer's batch waited for.
    first = host_tokens(Settings(data_dir=tmp_path / "one", cpu_tokens=True, device="cpu"))
    second = host_tokens(Settings(data_dir=tmp_path / "two", cpu_tokens=True, device="cpu"))
    assert first is not None and second is not None
    assert first.folder == tmp_path / "one" / "cpu-tokens"
    assert stat.S_IMODE(first.folder.stat().st_mode) == 0o700
    assert not str(first.folder).startswith(tempfile.gettempdir() + "/qfedit-cpu")
    with first.hold(first.cores):
        assert first.free() == 0 and second.free() == second.cores


def test_a_folder_others_may_write_to_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)  # as a pre-created folder in /tmp would be
    with pytest.raises(
        UnsafeFolderError, match=rf"{re.escape(str(folder))}: others may write to it \(mode 0777\)"
    ):
        CpuTokens(folder, cores=2)


def test_a_folder_another_user_owns_is_refused_naming_it(tmp_path: Path) -> None:
    # The attack: another local user pre-created the folder and held flocks on its files.
    folder = _someone_elses_folder(tmp_path)
    with pytest.raises(
        UnsafeFolderError, match=rf"{re.escape(str(folder))}: it belongs to user \d+, not to this user"
    ):
        CpuTokens(folder, cores=2)
    settings = Settings(data_dir=tmp_path, cpu_tokens_dir=folder, cpu_tokens=True, device="cpu")
    with pytest.raises(UnsafeFolderError, match="QFEDIT_CPU_TOKENS_DIR"):
        host_tokens(settings)


def test_a_folder_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeFolderError, match="is a symbolic link"):
        CpuTokens(tmp_path / "link", cores=2)
    assert list(real.iterdir()) == []


def test_a_lock_file_that_is_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    # The attack: a link planted as a core's lock file made `qfedit doctor` (as root) create the
    # file it pointed to.
    tokens = CpuTokens(tmp_path / "cores", cores=1)
    victim = tmp_path / "victim"
    (tokens.folder / "core-0.lock").symlink_to(victim)
    with pytest.raises(OSError, match=r"core-0\.lock"):
        tokens.free()
    assert not victim.exists()


def test_a_task_that_waits_for_cores_says_so_until_it_holds_them(tmp_path: Path) -> None:
    tokens = CpuTokens(tmp_path, cores=1, poll_s=0.01)
    heard: list[float | None] = []
    got: list[int] = []

    def task() -> None:
        with tokens.hold(1, waiting=heard.append) as count:
            got.append(count)

    with tokens.hold(1):
        waiter = threading.Thread(target=task)
        waiter.start()
        time.sleep(REPORT_AFTER_S + 0.5)
        assert got == [] and len(heard) == 1 and (heard[0] or 0) >= REPORT_AFTER_S
    waiter.join(timeout=10)
    assert got == [1] and heard[-1] is None
    heard.clear()
    with tokens.hold(1, waiting=heard.append):
        pass
    assert heard == []  # no wait, nothing said


def test_a_worker_refuses_to_start_on_a_folder_others_may_write_to(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env.update(QFEDIT_DATA_DIR=str(tmp_path / "data"), QFEDIT_CPU_TOKENS_DIR=str(folder))
    done = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"refusing the folder of the shared cores {folder}: others may write to it" in " ".join(
        done.stderr.split()
    )
