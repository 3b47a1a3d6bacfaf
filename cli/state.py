"""CLI commands over durable state: database, models, import, versions, aliases, audit log, gc."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.orm import Session

from api import views
from api.schemas import VersionDetail
from cli.app import alias_app, app, db_app, model_app
from cli.common import (
    JsonOption,
    ModelOption,
    console,
    current_actor,
    emit_json,
    errors,
    in_session,
    model_or_none,
    open_engine,
    single_model,
    user_errors,
)
from qfedit import registry
from qfedit.config import get_settings
from qfedit.db import migrate
from qfedit.db.models import FactStatus
from qfedit.errors import InvalidInputError
from qfedit.pipeline.settings import nested, validate_settings
from qfedit.store import store_from_settings

# -- db -------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    engine = open_engine()
    try:
        with user_errors():
            migrate.upgrade(engine, revision)
        console.print(
            f"database at {migrate.current(engine)} ({engine.url.render_as_string(hide_password=True)})"
        )
    finally:
        engine.dispose()


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")]) -> None:
    """Revert migrations down to REVISION (`base` drops every table)."""
    engine = open_engine()
    try:
        with user_errors():
            migrate.downgrade(engine, revision)
        console.print(f"database at {migrate.current(engine) or 'base'}")
    finally:
        engine.dispose()


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision the database is at."""
    engine = open_engine()
    try:
        console.print(migrate.current(engine) or "base (empty)")
    finally:
        engine.dispose()


# -- models ---------------------------------------------------------------------------------


@model_app.command("add")
def model_add(
    name: str,
    model_dir: Annotated[Path, typer.Argument(help="Directory holding the model's *.safetensors weights.")],
    layer: Annotated[int | None, typer.Option("--layer", help="Default layer to edit.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision or commit.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a base model; its fingerprint is computed from the weights."""
    from qfedit import registry

    def work(session: Session) -> None:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: not a directory")
        # Imported here: it pulls in torch, which only this command needs.
        from qfedit.modeling import weights_fingerprint

        fingerprint = weights_fingerprint(model_dir)
        model = registry.add_model(
            session,
            name=name,
            source=str(model_dir.resolve()),
            fingerprint=fingerprint,
            revision=revision,
            default_layer=layer,
            actor=current_actor(),
        )
        session.commit()
        if as_json:
            emit_json(views.model_out(model).model_dump(mode="json"))
        else:
            console.print(
                f"registered {model.name} (fingerprint {fingerprint[:16]}…), version {model.name}@0"
            )

    in_session(work)


@model_app.command("list")
def model_list(as_json: JsonOption = False) -> None:
    """List registered base models."""
    from qfedit import registry

    def work(session: Session) -> None:
        models = registry.list_models(session)
        if as_json:
            emit_json([views.model_out(m).model_dump(mode="json") for m in models])
            return
        table = Table("name", "source", "layer", "fingerprint", "added")
        for m in models:
            table.add_row(m.name, m.source, _cell(m.default_layer), m.fingerprint[:16], _when(m.created_at))
        console.print(table)

    in_session(work)


# -- import ---------------------------------------------------------------------------------


@app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="Corpus file to import.")],
    model_name: Annotated[str, typer.Option("--model", "-m", help="Model the facts are for.")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="jsonl, csv, counterfact, zsre or rejects (default: from the name)."),
    ] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Records per commit.")] = 2000,
    rejects: Annotated[
        Path | None, typer.Option("--rejects", help="Where to write rejected records.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import facts; re-importing skips what is already there. Bad records go to a rejects file."""
    from qfedit import importing, registry

    def work(session: Session) -> None:
        fmt_value = importing.Format(fmt) if fmt else importing.detect_format(file)
        model = registry.get_model(session, model_name)
        size = file.stat().st_size
        with Progress(
            TextColumn("importing {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=errors,
            transient=True,
            disable=as_json or not errors.is_terminal,
        ) as bar:
            task = bar.add_task(file.name, total=size)
            summary = importing.import_facts(
                session,
                file,
                model,
                fmt=fmt_value,
                actor=current_actor(),
                chunk_size=chunk_size,
                rejects_path=rejects,
                progress=lambda done: bar.update(task, completed=done),
            )
        if as_json:
            emit_json(summary.as_dict())
        else:
            table = Table(
                "read", "imported", "duplicates skipped", "rejected", title=f"{file.name} → {model.name}"
            )
            table.add_row(
                *(str(n) for n in (summary.read, summary.imported, summary.duplicates, summary.rejected))
            )
            console.print(table)
            for sample in summary.reject_samples:
                console.print(f"  rejected: {sample}", highlight=False)
            if summary.rejects_path:
                console.print(f"rejected records (fix and re-import): {summary.rejects_path}")
        if summary.stopped:
            errors.print(f"[red]stopped early:[/red] {summary.stopped}")
            raise typer.Exit(1)

    in_session(work)


# -- versions -------------------------------------------------------------------------------


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={_cell(v)}" for k, v in sorted(metrics.items()))


@app.command("versions")
def versions_command(model_name: ModelOption = None, as_json: JsonOption = False) -> None:
    """The versions of every model (or one): parent, who, why, fact changes, |dW|/|W|, metrics, aliases."""
    from qfedit import registry

    def work(session: Session) -> None:
        model = model_or_none(session, model_name)
        versions = registry.list_versions(session, model=model)
        aliases = registry.aliases_by_version(session, model)
        fact_sets = {v.id: registry.version_fact_ids(session, v) for v in versions}
        rows = []
        for v in versions:
            parent_facts = fact_sets.get(v.parent_id, set()) if v.parent_id is not None else set()
            rows.append(
                VersionDetail(
                    **views.version_out(v, aliases.get(v.id, [])).model_dump(),
                    facts_added=len(fact_sets[v.id] - parent_facts),
                    facts_removed=len(parent_facts - fact_sets[v.id]),
                ).model_dump(mode="json")
            )
        if as_json:
            emit_json(rows)
            return
        table = Table(
            "version", "parent", "when", "who", "reason", "+facts", "-facts", "|dW|/|W|", "metrics", "aliases"
        )
        for row, v in zip(rows, versions, strict=True):
            table.add_row(
                row["label"],
                _cell(row["parent"]),
                _when(v.created_at),
                v.created_by,
                v.reason,
                str(row["facts_added"]),
                str(row["facts_removed"]),
                _cell(v.relative_update_norm),
                _metrics(v.metrics),
                ", ".join(row["aliases"]),
            )
        console.print(table)

    in_session(work)


@app.command("show")
def show_command(
    version_ref: Annotated[str, typer.Argument(metavar="VERSION", help="MODEL@N, MODEL@ALIAS, or N.")],
    model_name: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """One version in full, with its facts."""
    from qfedit import registry

    def work(session: Session) -> None:
        version = registry.get_version(session, version_ref, model=model_or_none(session, model_name))
        aliases = registry.aliases_by_version(session, version.model).get(version.id, [])
        facts = registry.load_facts(session, registry.version_fact_ids(session, version))
        described = views.version_out(version, aliases).model_dump(mode="json")
        if as_json:
            emit_json({**described, "facts": [views.fact_out(f).model_dump(mode="json") for f in facts]})
            return
        table = Table(show_header=False, title=version.label)
        for key, value in described.items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else _cell(value))
        console.print(table)
        facts_table = Table("fact", "question", "answer", "status", title=f"{len(facts)} facts")
        for fact in facts:
            facts_table.add_row(str(fact.id), fact.question, fact.answer, fact.status.value)
        console.print(facts_table)

    in_session(work)


@app.command("diff")
def diff_command(
    old_ref: Annotated[str, typer.Argument(metavar="V1")],
    new_ref: Annotated[str, typer.Argument(metavar="V2")],
    model_name: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """What changed from V1 to V2: facts added and removed, metrics, and the norm of the weight difference."""
    from qfedit import registry

    def work(session: Session) -> None:
        model = model_or_none(session, model_name)
        old = registry.get_version(session, old_ref, model=model)
        new = registry.get_version(session, new_ref, model=model)
        diff = registry.diff_versions(session, old, new, store=store_from_settings(get_settings()))
        if as_json:
            emit_json(views.diff_out(diff).model_dump(mode="json"))
            return
        console.print(f"{old.label} → {new.label}: |ΔW|_F = {_cell(diff.weight_difference_norm)}")
        facts = Table("", "fact", "question", "answer")
        for sign, group in (("+", diff.added), ("-", diff.removed)):
            for fact in group:
                facts.add_row(sign, str(fact.id), fact.question, fact.answer)
        console.print(facts)
        if diff.metric_changes:
            metrics = Table("metric", old.label, new.label)
            for key, (a, b) in diff.metric_changes.items():
                metrics.add_row(key, _cell(a), _cell(b))
            console.print(metrics)

    in_session(work)


# -- audit log ------------------------------------------------------------------------------


@app.command("log")
def log_command(
    actor: Annotated[str | None, typer.Option(help="Only this actor.")] = None,
    action: Annotated[str | None, typer.Option(help="Only actions starting with this, e.g. alias.")] = None,
    object_type: Annotated[str | None, typer.Option("--object", help="Only this kind of object.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only entries at or after this time (UTC if no zone).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The audit log: who did what, when, and why."""
    from datetime import timezone

    from qfedit import registry

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)

    def work(session: Session) -> None:
        entries = registry.list_audit(
            session, actor=actor, action=action, object_type=object_type, since=since, limit=limit
        )
        if as_json:
            emit_json([views.audit_out(e).model_dump(mode="json") for e in entries])
            return
        table = Table("#", "when", "who", "action", "object", "details")
        for e in entries:
            table.add_row(
                str(e.id),
                _when(e.at),
                e.actor,
                e.action,
                f"{e.object_type} {e.object_id}",
                " ".join(
                    f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in e.details.items() if v is not None
                ),
            )
        console.print(table)

    in_session(work)


# -- aliases --------------------------------------------------------------------------------


@alias_app.command("set")
def alias_set(
    name: str,
    version_ref: Annotated[str, typer.Argument(metavar="VERSION", help="MODEL@N or N.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the alias history).")],
    model_name: ModelOption = None,
    expect_revision: Annotated[
        int | None, typer.Option("--expect-revision", help="Move only if the alias is at this revision.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Point alias NAME at VERSION (rolling back is pointing it at an older one)."""
    from qfedit import registry

    def work(session: Session) -> None:
        version = registry.get_version(session, version_ref, model=model_or_none(session, model_name))
        alias = registry.set_alias(
            session,
            name=name,
            version=version,
            reason=reason,
            actor=current_actor(),
            expect_revision=registry.UNSET if expect_revision is None else expect_revision,
        )
        session.commit()
        if as_json:
            emit_json({"alias": alias.name, "version": version.label, "revision": alias.revision})
        else:
            console.print(f"{alias.name} → {version.label} (revision {alias.revision})")

    in_session(work)


@alias_app.command("history")
def alias_history_command(name: str, model_name: ModelOption = None, as_json: JsonOption = False) -> None:
    """Every move of alias NAME, oldest first."""
    from qfedit import registry

    def work(session: Session) -> None:
        model = single_model(session, model_name)
        moves = registry.alias_history(session, model, name)
        rows = [
            {
                "moved_at": m.moved_at.isoformat(),
                "moved_by": m.moved_by,
                "from": m.from_version.number if m.from_version is not None else None,
                "to": m.to_version.number,
                "reason": m.reason,
            }
            for m in moves
        ]
        if as_json:
            emit_json(rows)
            return
        table = Table("when", "who", "from", "to", "reason", title=f"{model.name} alias {name}")
        for row, m in zip(rows, moves, strict=True):
            table.add_row(_when(m.moved_at), m.moved_by, _cell(row["from"]), str(row["to"]), m.reason)
        console.print(table)

    in_session(work)


@alias_app.command("list")
def alias_list(model_name: ModelOption = None, as_json: JsonOption = False) -> None:
    """Every alias and the version it points at."""
    from qfedit import registry

    def work(session: Session) -> None:
        aliases = registry.list_aliases(session, model=model_or_none(session, model_name))
        rows = [
            {"model": a.model.name, "alias": a.name, "version": a.version.number, "revision": a.revision}
            for a in aliases
        ]
        if as_json:
            emit_json(rows)
            return
        table = Table("model", "alias", "version", "revision")
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)

    in_session(work)


@app.command("facts")
def facts_command(
    model_name: ModelOption = None,
    status: Annotated[FactStatus | None, typer.Option(help="Only facts with this status.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List facts."""
    from qfedit import registry

    def work(session: Session) -> None:
        facts = registry.list_facts(
            session, model=model_or_none(session, model_name), status=status, limit=limit
        )
        if as_json:
            emit_json([views.fact_out(f).model_dump(mode="json") for f in facts])
            return
        table = Table("id", "model", "status", "question", "answer", "source")
        for f in facts:
            table.add_row(
                str(f.id),
                f.model.name,
                f.status.value,
                f.question,
                f.answer,
                f"{f.source}:{_cell(f.source_line)}",
            )
        console.print(table)

    in_session(work)


@app.command("gc")
def gc_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
    min_age: Annotated[
        float,
        typer.Option("--min-age", help="Leave files younger than this many seconds (in-flight writes)."),
    ] = 3600.0,
    as_json: JsonOption = False,
) -> None:
    """Remove checkpoint files no version references (left by a crash between write and record)."""
    from qfedit import registry

    def work(session: Session) -> None:
        store = store_from_settings(get_settings())
        garbage = store.garbage(registry.referenced_checkpoints(session), min_age_s=min_age)
        if not dry_run:
            store.remove(garbage)
            if garbage:
                registry.record_audit(
                    session,
                    actor=current_actor(),
                    action="store.gc",
                    object_type="store",
                    object_id="checkpoints",
                    details={"removed": garbage},
                )
                session.commit()
        if as_json:
            emit_json({"dry_run": dry_run, "files": garbage})
            return
        verb = "would remove" if dry_run else "removed"
        for path in garbage:
            console.print(f"{verb} {path}", highlight=False)
        console.print(f"{len(garbage)} unreferenced file(s) {verb}")

    in_session(work)


def _assign(target: dict[str, object], dotted: str, raw: str) -> None:
    """`solve.lam=10` sets target["solve"]["lam"] = 10; values are JSON when they parse as JSON."""
    import json

    keys = dotted.split(".")
    for key in keys[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise InvalidInputError(f"setting {dotted!r}: {key!r} is not a group")
        target = child
    try:
        target[keys[-1]] = json.loads(raw)
    except json.JSONDecodeError:
        target[keys[-1]] = raw


@model_app.command("configure")
def model_configure(
    name: str,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", help='KEY=VALUE, e.g. solve.rule=preserve, promote={"efficacy":0.9}'),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show or change how a model's batches are edited (layer, rule, corpora, promotion thresholds)."""

    def work(session: Session) -> None:
        model = registry.get_model(session, name)
        current = nested(model.settings)
        for item in assignments or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise InvalidInputError(f"--set {item!r}: expected KEY=VALUE")
            _assign(current, key.strip(), raw)
        validated = validate_settings(current, default_layer=model.default_layer, field="settings")
        if assignments:
            model.settings = validated.model_dump(mode="json", exclude_defaults=True)
            registry.record_audit(
                session,
                actor=current_actor(),
                action="model.configure",
                object_type="model",
                object_id=model.id,
                details={"settings": model.settings},
            )
            session.commit()
        shown = validated.model_dump(mode="json")
        if as_json:
            emit_json(shown)
            return
        console.print_json(data=shown)

    in_session(work)
