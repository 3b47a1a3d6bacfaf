"""The migrations where they are used: Alembic's command line in a checkout, and an installed wheel.

The migrations live in the top-level `migrations/` folder beside `alembic.ini`; pyproject.toml
ships that folder in the wheel as the package `qfedit.migrations`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qfedit.db import Base, migrate

REPO = Path(__file__).resolve().parents[2]
EVERY_TABLE = set(Base.metadata.tables) | {"alembic_version"}


def _tables(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def _env(**settings: str) -> dict[str, str]:
    """The environment, with qfedit's settings replaced (an empty URL means the data folder's SQLite file)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("QFEDIT_")}
    env.pop("PYTHONPATH", None)
    env.update(settings)
    return env


def _alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The console script, as a developer runs it: its sys.path starts at the venv's bin folder, so
    # only alembic.ini's prepend_sys_path puts this checkout's `qfedit` first.
    script = Path(sys.executable).with_name("alembic")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "alembic"]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_checkout_runs_the_folder_beside_alembic_ini() -> None:
    assert Path(migrate.script_location()) == REPO / "migrations"
    assert not (REPO / "qfedit" / "migrations").exists()


def test_alembic_command_line_upgrades_and_checks_from_the_repository_root(tmp_path: Path) -> None:
    # No URL: the settings' default, the SQLite file in the data folder.
    env = _env(QFEDIT_DATA_DIR=str(tmp_path / "data"), QFEDIT_DATABASE_URL="")
    database = tmp_path / "data" / "qfedit.db"

    upgraded = _alembic("upgrade", "head", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "Running upgrade" in upgraded.stderr  # alembic.ini's logging
    assert _tables(database) == EVERY_TABLE

    checked = _alembic("check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No new upgrade operations detected" in checked.stdout

    current = _alembic(
        "-x", f"url=sqlite:///{database}", "current", env=_env(QFEDIT_DATABASE_URL="sqlite://")
    )
    assert current.returncode == 0, current.stderr
    assert f"{migrate.head()} (head)" in current.stdout

    # `check` compares: a table no migration made is drift.
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE stray (id INTEGER PRIMARY KEY)")
    drifted = _alembic("-x", f"url=sqlite:///{database}", "check", env=env)
    assert drifted.returncode != 0
    assert "stray" in drifted.stdout + drifted.stderr


# What the image build copies (deploy/Dockerfile): the wheel must not need anything else.
SOURCES = ["pyproject.toml", "README.md", "qfedit", "worker", "api", "cli", "migrations"]


@pytest.mark.slow
def test_installed_wheel_carries_the_migrations_and_upgrades(tmp_path: Path) -> None:
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("building a wheel needs pip and setuptools in the test environment")
    # Built from a copy: a `build/` folder left in the checkout could add stale files to the wheel.
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=180,
    )
    (wheel,) = (tmp_path / "dist").glob("qfedit-*.whl")

    # Every module of the checkout is in the wheel; the migrations as `qfedit/migrations/...`.
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        path.relative_to(source).as_posix()
        for package in ("qfedit", "worker", "api", "cli")
        for path in source.joinpath(package).rglob("*.py")
    }
    expected |= {
        "qfedit/migrations/" + path.relative_to(source / "migrations").as_posix()
        for path in source.joinpath("migrations").rglob("*")
        if path.is_file()
    }
    assert expected <= names, f"missing from the wheel (pyproject.toml packages?): {sorted(expected - names)}"
    assert not any(name.startswith("migrations/") for name in names)

    # Installed on its own: PYTHONPATH comes before site-packages (and before the editable
    # finder of a development install), the working directory is an empty folder.
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        check=True,
        timeout=180,
    )
    run = tmp_path / "run"
    run.mkdir()
    env = _env(PYTHONPATH=str(site), QFEDIT_DATA_DIR=str(tmp_path / "data"), QFEDIT_DATABASE_URL="")

    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import qfedit, qfedit.migrations; from qfedit.db import migrate;"
            "print(qfedit.__file__); print(qfedit.migrations.__file__); print(migrate.script_location())",
        ],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    package, migrations, location = where.stdout.split()
    assert Path(package).is_relative_to(site)
    assert Path(migrations) == site / "qfedit" / "migrations" / "__init__.py"
    assert location == "qfedit:migrations"

    upgraded = subprocess.run(
        [sys.executable, "-m", "cli", "db", "upgrade"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert _tables(tmp_path / "data" / "qfedit.db") == EVERY_TABLE
