"""CLI commands over a model's history: versions, show, diff, the audit log, aliases, gc."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy.orm import Session

from cli.app import alias_app, app
from cli.common import (
    JsonOption,
    ModelOption,
    cell,
    console,
    current_actor,
    emit_json,
    in_session,
    model_or_none,
    single_model,
    when,
)
from qfedit import registry
from qfedit.app import views
from qfedit.app.schemas import VersionDetail
from qfedit.config import get_settings
from qfedit.store import store_from_settings

# -- versions -------------------------------------------------------------------------------


def _share(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-"


def rounded(value: object) -> object:
    """`value` with its floats at 4 significant digits: a table is read, not parsed (--json is)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


@app.command("versions")
def versions_command(
    model_name: ModelOption = None,
    show_all: Annotated[bool, typer.Option("--all", help="Archived versions too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The versions of every model (or one): parent, who, why, fact changes, |dW|/|W|, metrics, aliases."""

    def work(session: Session) -> None:
        model = model_or_none(session, model_name)
        versions = registry.list_versions(session, model=model, archived=show_all)
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
        # Fits 80 columns: the four quality metrics as short columns; parent, reason, norms and
        # the rest of the metrics are behind `qfedit show NAME@N` (and --json).
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("version", "when", "who", "facts"):
            table.add_column(column, no_wrap=column != "who")
        for column in ("eff", "para", "spec", "abst"):
            table.add_column(column, justify="right")
        table.add_column("aliases")
        for row, v in zip(rows, versions, strict=True):
            table.add_row(
                row["label"],
                f"{v.created_at.astimezone():%m-%d %H:%M}",
                v.created_by,
                f"+{row['facts_added']} -{row['facts_removed']}",
                *(
                    _share(v.metrics.get(name))
                    for name in ("efficacy", "paraphrase", "specificity", "abstention")
                ),
                ", ".join(row["aliases"]) + (" (archived)" if row["archived"] else ""),
            )
        console.print(table)

    in_session(work)


def _tag_items(items: list[str] | None) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: give KEY=VALUE", param_hint="--tag")
        tags[key.strip()] = value
    return tags


@app.command("describe")
def describe_command(
    ref: Annotated[str, typer.Argument(help="A model (NAME) or a version (NAME@3, NAME@production).")],
    description: Annotated[str | None, typer.Option(help="The new description ('' clears it).")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE to set; repeat for several.")] = None,
    untag: Annotated[list[str] | None, typer.Option(help="A tag key to remove; repeat for several.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Set a model's or a version's description and tags (audited), and show them."""
    from qfedit.registry.base import UNSET

    tags = _tag_items(tag)

    def work(session: Session) -> None:
        changes = {
            "actor": current_actor(),
            "description": UNSET if description is None else description,
            "tags": tags,
            "remove_tags": untag or [],
        }
        if "@" in ref:
            version = registry.get_version(session, ref)
            registry.describe_version(session, version, **changes)  # type: ignore[arg-type]
            session.commit()
            session.refresh(version)
            shown = views.version_out(version).model_dump(mode="json")
        else:
            model = registry.get_model(session, ref)
            registry.describe_model(session, model, **changes)  # type: ignore[arg-type]
            session.commit()
            shown = views.model_out(model).model_dump(mode="json")
        picked = {
            k: shown[k] for k in ("description", "tags") + (("archived",) if "archived" in shown else ())
        }
        if as_json:
            emit_json(picked)
            return
        for key, value in picked.items():
            console.print(f"{key:>12}: {value}", highlight=False, markup=False)

    in_session(work)


@app.command("archive")
def archive_command(
    ref: Annotated[str, typer.Argument(help="A version, NAME@3.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    restore: Annotated[bool, typer.Option("--restore", help="Bring an archived version back.")] = False,
) -> None:
    """Archive a version: out of `qfedit versions` (`--all` shows it), its checkpoint kept; an
    alias's version cannot be archived, and an archived one cannot become an alias's."""

    def work(session: Session) -> None:
        version = registry.get_version(session, ref)
        registry.archive_version(session, version, actor=current_actor(), reason=reason, archived=not restore)
        session.commit()
        console.print(f"{version.label} {'restored' if restore else 'archived'}", highlight=False)

    in_session(work)


@app.command("show")
def show_command(
    version_ref: Annotated[str, typer.Argument(metavar="VERSION", help="MODEL@N, MODEL@ALIAS, or N.")],
    model_name: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """One version in full, with its facts."""

    def work(session: Session) -> None:
        version = registry.get_version(session, version_ref, model=model_or_none(session, model_name))
        aliases = registry.aliases_by_version(session, version.model).get(version.id, [])
        facts = registry.load_facts(session, registry.version_fact_ids(session, version))
        described = views.version_out(version, aliases).model_dump(mode="json")
        if as_json:
            emit_json({**described, "facts": [views.fact_out(f).model_dump(mode="json") for f in facts]})
            return
        table = Table(show_header=False, title=version.label, box=box.SIMPLE)
        for key, value in described.items():
            if isinstance(value, dict) and value:
                table.add_row(key, "")
                for name, inner in value.items():
                    shown = json.dumps(rounded(inner)) if isinstance(inner, dict | list) else cell(inner)
                    table.add_row(f"  {name}", shown)
            else:
                table.add_row(
                    key, json.dumps(rounded(value)) if isinstance(value, dict | list) else cell(value)
                )
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

    def work(session: Session) -> None:
        model = model_or_none(session, model_name)
        old = registry.get_version(session, old_ref, model=model)
        new = registry.get_version(session, new_ref, model=model)
        diff = registry.diff_versions(session, old, new, store=store_from_settings(get_settings()))
        if as_json:
            emit_json(views.diff_out(diff).model_dump(mode="json"))
            return
        console.print(f"{old.label} → {new.label}: |ΔW|_F = {cell(diff.weight_difference_norm)}")
        facts = Table("", "fact", "question", "answer")
        for sign, group in (("+", diff.added), ("-", diff.removed)):
            for fact in group:
                facts.add_row(sign, str(fact.id), fact.question, fact.answer)
        for older, newer in diff.updated:
            facts.add_row("~", f"{older.id}→{newer.id}", newer.question, f"{older.answer} → {newer.answer}")
        console.print(facts)
        if diff.metric_changes:
            metrics = Table("metric", old.label, new.label)
            for key, (a, b) in diff.metric_changes.items():
                metrics.add_row(key, cell(a), cell(b))
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

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)

    def work(session: Session) -> None:
        entries = registry.list_audit(
            session, actor=actor, action=action, object_type=object_type, since=since, limit=limit
        )
        if as_json:
            emit_json([views.audit_out(e).model_dump(mode="json") for e in entries])
            return
        names = registry.object_names(session, entries)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("#", "when", "who", "action", "object"):
            table.add_column(column, no_wrap=True)
        table.add_column("details", overflow="fold")
        for e in entries:
            table.add_row(
                str(e.id),
                f"{e.at.astimezone():%m-%d %H:%M}",
                e.actor,
                e.action,
                names[e.id],
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
    """Every move of alias NAME (or MODEL@NAME), oldest first."""

    def work(session: Session) -> None:
        nonlocal name
        given = model_name
        if "@" in name and given is None:
            given, name = name.split("@", 1)
        if given is None:
            # The models that have this alias: one of them is the one meant.
            holders = [a.model for a in registry.list_aliases(session) if a.name == name]
            model = holders[0] if len(holders) == 1 else single_model(session, None)
        else:
            model = registry.get_model(session, given)
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
            table.add_row(when(m.moved_at), m.moved_by, cell(row["from"]), str(row["to"]), m.reason)
        console.print(table)

    in_session(work)


@alias_app.command("list")
def alias_list(model_name: ModelOption = None, as_json: JsonOption = False) -> None:
    """Every alias and the version it points at."""

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

    def work(session: Session) -> None:
        store = store_from_settings(get_settings())
        garbage = store.garbage(registry.referenced_checkpoints(session), min_age_s=min_age)
        if not dry_run and garbage:
            # Looked at again just before removing: a writer may have stored (and recorded) one of
            # them since the listing. The store re-checks each file's age at the unlink itself.
            session.rollback()
            referenced = registry.referenced_checkpoints(session)
            garbage = [path for path in garbage if path not in referenced]
            store.remove(garbage, min_age_s=min_age)
            if garbage:
                registry.record_audit(
                    session,
                    actor=current_actor(),
                    action="store.gc",
                    object_type="store",
                    object_id="checkpoints",
                    model_id=None,
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
