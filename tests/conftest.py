from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite isolates itself from the host: a deployment's settings in the shell that runs it
# (a database, a broker, a core folder shared with running workers) reach no test or worker.
# QFEDIT_TEST_* configure the suite itself and stay.
for _name in [k for k in os.environ if k.startswith("QFEDIT_") and not k.startswith("QFEDIT_TEST_")]:
    del os.environ[_name]
# Every process a test starts inherits this tag (environments are copied from os.environ), so
# the session can find any it left behind, reparented or not.
RUN_TAG = "PYTEST_QFEDIT_RUN"
os.environ[RUN_TAG] = uuid.uuid4().hex

from tiny_models import build_model  # noqa: E402  (after the path and the environment)

FAMILIES = ["qwen2", "llama", "mistral", "gemma", "gemma3_text", "phi3", "gpt2"]


def _left_behind() -> dict[int, str]:
    """Live processes (not this one) carrying this session's tag: pid -> command line."""
    wanted = f"{RUN_TAG}={os.environ[RUN_TAG]}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited; its parent has not reaped it yet
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test leaves a process behind: any still running when the suite ends (after a grace
    period for ones that are exiting) is named, killed, and fails the run."""
    if not sys.platform.startswith("linux"):
        return
    deadline = time.monotonic() + 15
    left = _left_behind()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _left_behind()
    if not left:
        return
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items()))
    message = f"processes left behind by the tests (killed now):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Folders whose tests run the system's real processes end to end (Celery workers on Redis, the
# API and serve as servers, Chromium, compose files, a real model): `make test` runs them, `make
# test-fast` leaves them out (`-m "not e2e"`).
E2E_FOLDERS = frozenset({"pipeline", "real", "deploy", "webconsole"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(root).parts if item.path.is_relative_to(root) else ()
        if (parts and parts[0] in E2E_FOLDERS) or item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.e2e)


def pytest_configure(config: pytest.Config) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_model(root / family, family) for family in FAMILIES}
