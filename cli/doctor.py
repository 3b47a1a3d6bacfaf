"""`qfedit doctor`: is everything a batch needs there? The checks `/readyz` makes (database,
broker), and the store, the host's shared cores, the workers and each model's files and settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.table import Table

from cli.app import app
from cli.common import JsonOption, console, emit_json
from qfedit.config import Settings, get_settings


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str


def _database(settings: Settings) -> list[Check]:
    from qfedit.db import migrate
    from qfedit.db.engine import engine_from_settings

    shown = settings.resolved_database_url.split("://", 1)[0]
    engine = engine_from_settings(settings)
    try:
        current, head = migrate.current(engine), migrate.head()
    except Exception as err:  # a check reports, it does not raise
        return [Check("database", "fail", f"{shown}: unreachable ({type(err).__name__}: {err})")]
    finally:
        engine.dispose()
    if current != head:
        return [
            Check(
                "database",
                "fail",
                f"{shown}: schema {current or 'none'}, not {head}: run `qfedit db upgrade`",
            )
        ]
    return [Check("database", "ok", f"{shown}, schema {head}")]


def _broker(settings: Settings) -> Check:
    from worker.client import broker_reachable

    if not settings.broker_url:
        return Check("broker", "ok", f"embedded, in {settings.data_dir / 'broker'}")
    if broker_reachable(settings):
        return Check("broker", "ok", settings.broker_url.split("@")[-1])
    return Check("broker", "fail", f"{settings.broker_url.split('@')[-1]} unreachable")


def _store(settings: Settings) -> Check:
    from qfedit.store import store_from_settings

    try:
        store = store_from_settings(settings)
        # Content-addressed: the probe is one fixed object, written once and read back verified.
        probe = store.put_bytes(b"qfedit doctor: the store takes writes and verified reads\n", ".probe")
        store.read_bytes(probe.path, probe.sha256)
    except Exception as err:
        return Check("store", "fail", f"{type(err).__name__}: {err}")
    return Check("store", "ok", f"{store!r}: write and verified read")


def _cores(settings: Settings) -> Check:
    from qfedit.cpu import host_tokens

    threads = settings.torch_threads or "every core"
    try:
        tokens = host_tokens(settings)
        free = tokens.free() if tokens is not None else 0
    except OSError as err:  # a worker could not run a task either
        return Check("cores", "fail", f"cannot use the folder of the shared cores: {err}")
    if tokens is None:
        return Check("cores", "ok", f"not shared (device {settings.device}); torch threads: {threads}")
    return Check(
        "cores",
        "ok",
        f"{tokens.cores} shared by this host's workers in {tokens.folder}, {free} free now; "
        f"a task's share: {threads}",
    )


def _workers_and_models(settings: Settings) -> list[Check]:
    from qfedit import registry
    from qfedit.db.engine import engine_from_settings, session_factory
    from qfedit.errors import QFEditError
    from qfedit.pipeline.preflight import check_runnable
    from qfedit.pipeline.settings import validate_settings
    from qfedit.registry.workers import live_within_s
    from worker.app import queue_names

    checks = []
    engine = engine_from_settings(settings)
    try:
        with session_factory(engine)() as session:
            workers = registry.live_workers(session, settings.heartbeat_s)
            if not settings.broker_url:
                checks.append(Check("workers", "ok", "embedded: `batch submit` and `qfedit api` start one"))
            else:
                missing = [q for q in queue_names(settings) if not registry.listening(workers, q)]
                names = ", ".join(f"{w.hostname} ({w.queues})" for w in workers) or "none"
                status = "fail" if missing else "ok"
                detail = f"seen in the last {live_within_s(settings.heartbeat_s):.0f} s: {names}"
                if missing:
                    detail += f"; nobody consumes {', '.join(missing)}: start `qfedit worker`"
                checks.append(Check("workers", status, detail))
            for model in registry.list_models(session):
                try:
                    if not (Path(model.source) / "config.json").is_file():
                        raise FileNotFoundError(f"no model directory at {model.source}")
                    model_settings = validate_settings(model.settings, default_layer=model.default_layer)
                    check_runnable(model_settings, source=model.source, app=settings)
                except (QFEditError, FileNotFoundError) as err:
                    checks.append(Check(f"model {model.name}", "fail", str(err)))
                else:
                    checks.append(Check(f"model {model.name}", "ok", f"{model.source}, settings can edit"))
    except Exception as err:
        checks.append(Check("workers", "fail", f"cannot read the database ({type(err).__name__})"))
    finally:
        engine.dispose()
    return checks


@app.command()
def doctor(as_json: JsonOption = False) -> None:
    """Check what batches need: database (at the latest schema), broker, checkpoint store, the
    host's shared cores, workers listening, and each model's directory and settings. Exits 1 when
    something fails."""
    settings = get_settings()
    checks = _database(settings)
    checks += [_broker(settings), _store(settings), _cores(settings)]
    if checks[0].status == "ok":
        checks += _workers_and_models(settings)
    if as_json:
        emit_json([asdict(c) for c in checks])
    else:
        table = Table("check", "", "detail")
        marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        for c in checks:
            table.add_row(c.name, marks[c.status], c.detail)
        console.print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
