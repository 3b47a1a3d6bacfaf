"""deploy/systemd: units systemd accepts, whose ExecStart lines are commands the CLI has."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, example_environment, run_help, split, substitute

UNITS = DEPLOY / "systemd"
INSTALLED_QFEDIT = "/opt/qfedit/venv/bin/qfedit"
NAMES = [
    "qfedit-migrate.service",
    "qfedit-api.service",
    "qfedit-worker@.service",
    "qfedit-beat.service",
    "qfedit-serve.service",
]


def _entries(unit: Path) -> dict[str, list[str]]:
    """`Key=value` lines, keyed by `Section.Key`; keys like Environment= may repeat."""
    entries: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def _environment(entries: dict[str, list[str]]) -> dict[str, str]:
    """What the process sees: Environment= defaults, then the environment file (as systemd)."""
    values: dict[str, str] = {}
    for line in entries.get("Service.Environment", []):
        for assignment in split(line):
            name, _, value = assignment.partition("=")
            values[name] = value
    values.update(example_environment())
    return values


def test_the_units_are_all_there() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_reads_the_environment_file_and_waits_for_migration(name: str) -> None:
    entries = _entries(UNITS / name)
    assert entries["Service.EnvironmentFile"] == ["/etc/qfedit/qfedit.env"]
    assert entries["Service.User"] == ["qfedit"]
    if name == "qfedit-migrate.service":
        assert entries["Service.Type"] == ["oneshot"] and entries["Service.RemainAfterExit"] == ["yes"]
    elif name == "qfedit-worker@.service":
        assert "qfedit-migrate.service" in entries["Unit.After"][0]
        assert "CUDA_VISIBLE_DEVICES=%i" in entries["Service.Environment"][-1]  # after the file
    else:
        assert entries["Unit.Requires"] == ["qfedit-migrate.service"]
        assert "qfedit-migrate.service" in entries["Unit.After"][0]


@pytest.mark.parametrize("name", NAMES)
def test_each_exec_start_is_a_cli_command(name: str) -> None:
    entries = _entries(UNITS / name)
    (exec_start,) = entries["Service.ExecStart"]
    # systemd's own specifiers: the instance (a GPU index) and the host name.
    line = (
        substitute(exec_start, _environment(entries)).replace("%i", "0").replace("%H", socket.gethostname())
    )
    program, *argv = split(line)
    assert program == INSTALLED_QFEDIT
    code, output = run_help(argv)
    assert code == 0, f"qfedit {' '.join(argv)} --help: {output}"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify checks that ExecStart's program exists, so point it at this venv's qfedit; and a
    # template is verified through an instance of it.
    qfedit = Path(sys.executable).parent / "qfedit"
    for name in NAMES:
        text = (UNITS / name).read_text().replace(INSTALLED_QFEDIT, str(qfedit))
        (tmp_path / name.replace("@.", "@0.")).write_text(text)
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit 0): none may name these units.
    assert "qfedit" not in result.stdout + result.stderr, result.stdout + result.stderr
