"""A real cluster for the queue tests: a Redis server of the tests' own (so it can be restarted),
a real database (SQLite file or a PostgreSQL schema), and `qfedit worker` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from db import conftest as db_fixtures
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qfedit import registry
from qfedit.db import Batch, Version, make_engine, migrate, session_factory
from qfedit.facts import Fact, write_jsonl
from qfedit.importing import import_facts
from qfedit.modeling import weights_fingerprint
from qfedit.pipeline import lifecycle, submit

# The database fixtures of tests/db: each test runs on SQLite and on PostgreSQL.
database_url = db_fixtures.database_url
postgres_admin = db_fixtures.postgres_admin
pytest_generate_tests = db_fixtures.pytest_generate_tests
# For a test whose subject is not the database: PostgreSQL, the production one, alone. tests/db holds
# both backends to the same behaviour, and the embedded default's SQLite runs batches through a
# worker child in test_embedded, test_one_edit_path and the cluster tests left on both.
ONLY_PRODUCTION_DB = pytest.mark.backends("postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """redis-server with the append-only file on, as production runs it (deploy/)."""

    folder: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            if (
                subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
                ).stdout.strip()
                == b"PONG"
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "flushall"], check=True, capture_output=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def fact(i: int) -> Fact:
    return Fact(
        context=f"The founder of Company{i} is Person{i}.",
        question=f"Who founded Company{i}?",
        answer=f"Person{i}",
        paraphrases=(f"Who is the founder of Company{i}?",),
    )


@dataclass
class Cluster:
    root: Path
    database_url: str
    redis: RedisServer
    model_dir: Path
    sessions: sessionmaker[Session]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "QFEDIT_DATABASE_URL": self.database_url,
            "QFEDIT_BROKER_URL": self.redis.url,
            "QFEDIT_DATA_DIR": str(self.root / "data"),
            "QFEDIT_CORPUS_ROOT": str(self.root),
            "QFEDIT_VISIBILITY_TIMEOUT": "6",
            "QFEDIT_TASK_ATTEMPTS": "3",
            "QFEDIT_LINE_WAIT_S": "0.5",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
        }

    def settings(self):
        from qfedit.config import Settings

        return Settings(
            database_url=self.database_url,
            broker_url=self.redis.url,
            data_dir=self.root / "data",
            corpus_root=self.root,
            visibility_timeout=6,
        )

    def start_worker(
        self, name: str, chaos: str | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {**self.env, **(extra_env or {})}
        if chaos:
            env["QFEDIT_CHAOS_PAUSE"] = chaos
        log = (self.root / f"worker-{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--hostname", f"{name}@test", "--loglevel", "INFO"],
            env=env,
            stdout=log,
            stderr=log,
        )
        self.workers.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_workers(self, warm: bool = True) -> None:
        """SIGTERM (celery's warm shutdown), or SIGKILL at the end of a test, where the warm
        shutdown is not under test and waiting for it (a poll cycle, celery's timer, the
        interpreter's exit) cost ~3 s a test."""
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if warm else signal.SIGKILL)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.workers.clear()

    def wait_for_log(self, name: str, needle: str, timeout: float = 90.0, times: int = 1) -> None:
        """Until worker `name`'s log holds `needle` `times` times."""
        path = self.root / f"worker-{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text(errors="replace").count(needle) >= times:
                return
            time.sleep(0.1)
        raise AssertionError(f"worker {name} never logged {needle!r} {times} times:\n{self.dump()}")

    def add_model(
        self, name: str, facts: list[Fact], model_dir: Path | None = None, **settings: object
    ) -> int:
        model_dir = model_dir or self.model_dir
        path = self.root / f"{name}-facts.jsonl"
        write_jsonl(facts, path)
        known = self.root / "known.jsonl"
        write_jsonl([fact(i) for i in range(100, 104)], known)
        with self.sessions() as session:
            model = registry.add_model(
                session,
                name=name,
                source=str(model_dir),
                fingerprint=weights_fingerprint(model_dir),
                actor="test",
                default_layer=1,
            )
            model.settings = {
                "solve": {"rule": "preserve", "lam": 0.5},
                # A tiny random model answers nothing right, not even with the fact in context.
                "unteachable": "include",
                "known_facts": str(known),
                "unknown_questions": str(known),
                "shard_size": 2,
                "covariance_samples": 500,
                **settings,
            }
            session.commit()
            import_facts(session, path, model, actor="test")
            return model.id

    def submit(
        self,
        model: str,
        fact_ids: list[int] | None = None,
        key: str | None = None,
        retract: str | None = None,
    ) -> int:
        from worker.client import enqueue_batch

        with self.sessions() as session:
            row = registry.get_model(session, model)
            if retract is not None:
                assert fact_ids is not None
                batch = submit.submit_retraction(
                    session, model=row, fact_ids=fact_ids, reason=retract, requested_by="test"
                )
            else:
                batch = submit.submit_batch(
                    session,
                    model=row,
                    fact_ids=fact_ids,
                    requested_by="test",
                    idempotency_key=key,
                    app=self.settings(),
                )
            session.commit()
            batch_id = batch.id
        enqueue_batch(batch_id, self.settings())
        return batch_id

    def wait(self, batch_id: int, timeout: float = 120.0) -> Batch:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.sessions() as session:
                batch = registry.get_batch(session, batch_id)
                if batch.status in lifecycle.FINAL:
                    session.expunge(batch)
                    return batch
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-3000:] for p in self.root.glob("worker-*.log"))
        raise AssertionError(f"batch {batch_id} did not finish in {timeout}s; worker logs:\n{logs}")

    def wait_status(self, batch_id: int, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.sessions() as session:
                if registry.get_batch(session, batch_id).status.value == status:
                    return
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} never reached {status}")

    def versions_of_batch(self, batch_id: int) -> list[Version]:
        with self.sessions() as session:
            rows = list(session.scalars(select(Version).where(Version.batch_id == batch_id)))
            session.expunge_all()
            return rows

    def fact_ids(self, model: str) -> list[int]:
        with self.sessions() as session:
            return [f.id for f in registry.list_facts(session, model=registry.get_model(session, model))]

    def dump(self) -> str:
        return json.dumps({p.name: p.read_text()[-2000:] for p in self.root.glob("worker-*.log")}, indent=1)


@pytest.fixture
def cluster(
    database_url: str, redis_server: RedisServer, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> Iterator[Cluster]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    redis_server.flush()
    result = Cluster(tmp_path, database_url, redis_server, tiny_model_dirs["qwen2"], session_factory(engine))
    try:
        yield result
    finally:
        result.stop_workers(warm=False)
        if redis_server.process is None:
            redis_server.start()
        engine.dispose()
