"""How long each console page takes on a large history (prints a table).

    python bench/console_pages.py                                  # SQLite in a temporary folder
    python bench/console_pages.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test

The history: one model with 100,000 facts and 1,000 versions. Version k (1-998) holds a window
of 1,000 facts that moves by 100 each version (100 added, 100 retracted against its parent),
version 999 holds all 100,000 (a diff of 99,000 against its parent); 1,000 batches, 200 moves of
`production`, 20,000 audit entries over two models. About 1.1 million version-fact rows, written
with plain INSERTs (this measures reading). Each page is the HTML part the console fetches,
through the whole ASGI app with a read token (FastAPI's TestClient); the median of 5 requests
after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, insert, text

from api.app import create_app
from qfedit.config import ApiToken, Settings
from qfedit.db import make_engine, migrate
from qfedit.db.models import (
    Alias,
    AliasMove,
    AuditEntry,
    Batch,
    BatchFact,
    BatchStatus,
    FactRow,
    FactStatus,
    Model,
    Version,
    VersionFact,
    utcnow,
)

FACTS, VERSIONS, WINDOW, STEP = 100_000, 1_000, 1_000, 100
TOKEN = "bench-read-token-0123456789abcdef"
BUDGET_MS = 300


def _chunks(rows: list[dict[str, Any]], size: int = 20_000) -> list[list[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def build(engine: Engine) -> None:
    start = utcnow() - timedelta(days=VERSIONS)
    with engine.begin() as connection:
        for model_id, name in ((1, "big"), (2, "other")):
            connection.execute(
                insert(Model).values(
                    id=model_id,
                    name=name,
                    source=f"/models/{name}",
                    fingerprint="f" * 64,
                    created_by="bench",
                    settings={"layers": [0, 1, 2, 3, 4], "solve": {"rule": "seed"}},
                )
            )
        facts = [
            {
                "id": i + 1,
                "model_id": 1,
                "content_hash": f"{i:064x}",
                "question": f"Who founded Company{i}?",
                "answer": f"Person{i}",
                "context": f"The founder of Company{i} is Person{i}.",
                "subject": f"Company{i}",
                "paraphrases": [f"Who is the founder of Company{i}?"],
                "neighbors": [],
                "source": "corpus.jsonl",
                "source_line": i + 1,
                "status": FactStatus.APPLIED,
                "created_at": start,
            }
            for i in range(FACTS)
        ]
        for chunk in _chunks(facts):
            connection.execute(insert(FactRow), chunk)
        versions, batches, members, batch_members = [], [], [], []
        for number in range(VERSIONS):
            if number == 0:
                window: range = range(0)
            elif number < VERSIONS - 1:
                low = max(0, number * STEP - WINDOW)
                window = range(low, min(FACTS, number * STEP))
            else:
                window = range(FACTS)
            at = start + timedelta(days=number)
            if number:
                batches.append(
                    {
                        "id": number,
                        "model_id": 1,
                        "status": BatchStatus.PUBLISHED,
                        "hyperparameters": {},
                        "requested_by": "nightly",
                        "progress": 1.0,
                        "created_at": at,
                        "updated_at": at,
                        "finished_at": at,
                    }
                )
                added = range(max(window.start, window.stop - STEP), window.stop)
                batch_members += [{"batch_id": number, "fact_id": i + 1} for i in added]
            versions.append(
                {
                    "id": number + 1,
                    "model_id": 1,
                    "number": number,
                    "parent_id": number if number else None,
                    "batch_id": number or None,
                    "layer": 4,
                    "rule": "seed",
                    "hyperparameters": {"layers": [0, 1, 2, 3, 4]},
                    "relative_update_norm": 0.01,
                    "metrics": {
                        "efficacy": 0.95 + (number % 5) / 100,
                        "paraphrase": 0.9,
                        "specificity": 0.97,
                        "abstention": 0.99,
                        "protocol": {"held_out": True},
                    },
                    "fact_set_digest": f"{number:064x}",
                    "fact_count": len(window),
                    "created_at": at,
                    "created_by": "nightly",
                    "reason": f"batch {number}",
                }
            )
            members += [{"version_id": number + 1, "fact_id": i + 1} for i in window]
        connection.execute(insert(Batch), batches)
        connection.execute(insert(Version), versions)
        for chunk in _chunks(members, 50_000):
            connection.execute(insert(VersionFact), chunk)
        for chunk in _chunks(batch_members, 50_000):
            connection.execute(insert(BatchFact), chunk)
        connection.execute(
            insert(Alias).values(id=1, model_id=1, name="production", version_id=VERSIONS, revision=200)
        )
        connection.execute(
            insert(AliasMove),
            [
                {
                    "alias_id": 1,
                    "from_version_id": 5 * k if k else None,
                    "to_version_id": 5 * (k + 1),
                    "moved_at": start + timedelta(days=5 * k),
                    "moved_by": "release-bot",
                    "reason": f"release {k}",
                }
                for k in range(200)
            ],
        )
        connection.execute(
            insert(AuditEntry),
            [
                {
                    "at": start + timedelta(minutes=k),
                    "actor": ("nightly", "alice", "release-bot")[k % 3],
                    "action": ("batch.status", "version.create", "alias.set", "facts.import")[k % 4],
                    "object_type": "batch",
                    "object_id": str(k % 999 + 1),
                    "details": {"k": k},
                    "model_id": 1 + k % 2,
                }
                for k in range(20_000)
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: SQLite in a temporary folder")
    args = parser.parse_args()
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'qfedit.db'}"
        schema = None
        if url.startswith("postgresql"):
            schema = f"qfedit_console_{uuid.uuid4().hex[:8]}"
            with make_engine(url).begin() as connection:
                connection.execute(text(f"CREATE SCHEMA {schema}"))
            url = f"{url}?options=-csearch_path%3D{schema}"
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            started = time.perf_counter()
            build(engine)
            with engine.begin() as connection:  # statistics, as autovacuum keeps them on a live database
                connection.execute(text("ANALYZE"))
            console.print(f"built the history in {time.perf_counter() - started:.0f} s", style="dim")
            settings = Settings(
                data_dir=Path(tmp) / "data",
                database_url=url,
                api_tokens={"bench": ApiToken(token=TOKEN, scope="read")},
            )
            pages = [
                ("models", "/ui/part/models"),
                ("model, page 1", "/ui/part/models/big"),
                ("model, page 40 (oldest)", "/ui/part/models/big?page=40"),
                ("model's batches (live part)", "/ui/part/models/big/batches"),
                ("model's aliases (live part)", "/ui/part/models/big/aliases"),
                ("version 500: added", "/ui/part/models/big/versions/500"),
                ("version 500: retracted", "/ui/part/models/big/versions/500?show=retracted"),
                ("version 999: 99,000 added, page 1", "/ui/part/models/big/versions/999"),
                ("version 999: added, page 1,980", "/ui/part/models/big/versions/999?page=1980"),
                ("fact in 11 versions", "/ui/part/facts/50000"),
                ("search by text (1 match)", "/ui/part/facts?q=Company98765"),
                ("search by text (many)", "/ui/part/facts?q=Person&model=big&page=100"),
                ("search by id", "/ui/part/facts?q=4242"),
                ("audit log", "/ui/part/audit"),
                ("audit: model + actor + action", "/ui/part/audit?model=big&actor=alice&action=alias"),
                ("audit: since/until", "/ui/part/audit?since=2000-01-01T00:00&until=2100-01-01T00:00"),
            ]
            table = Table(
                title=f"Console pages: {FACTS:,} facts, {VERSIONS:,} versions ({engine.dialect.name})"
            )
            for column in ("page", "median ms", "max ms", f"under {BUDGET_MS} ms"):
                table.add_column(column, justify="right")
            with TestClient(create_app(settings)) as client:
                headers = {"Authorization": f"Bearer {TOKEN}"}
                for label, path in pages:
                    assert client.get(path, headers=headers).status_code == 200, path
                    times = []
                    for _ in range(5):
                        began = time.perf_counter()
                        response = client.get(path, headers=headers)
                        times.append(1000 * (time.perf_counter() - began))
                        assert response.status_code == 200, (path, response.text[:300])
                    median = statistics.median(times)
                    table.add_row(
                        label, f"{median:.0f}", f"{max(times):.0f}", "yes" if median < BUDGET_MS else "NO"
                    )
            console.print(table)
        finally:
            engine.dispose()
            if schema is not None:
                with make_engine(args.database_url).begin() as connection:
                    connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))


if __name__ == "__main__":
    main()
