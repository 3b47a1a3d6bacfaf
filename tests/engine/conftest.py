"""The engine commands keep their covariance cache in the data folder: one per test, not the
working directory's `qfedit-data`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "qfedit-data"
    monkeypatch.setenv("QFEDIT_DATA_DIR", str(folder))
    return folder
