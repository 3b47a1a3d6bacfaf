"""CLI commands over what the registry holds: database schema, models and their settings, fact
import and listing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.orm import Session

from cli.app import app, db_app, model_app
from cli.common import (
    JsonOption,
    ModelOption,
    cell,
    console,
    current_actor,
    emit_json,
    errors,
    in_session,
    model_or_none,
    open_engine,
    user_errors,
    when,
)
from qfedit import presets, registry
from qfedit.app import views
from qfedit.config import get_settings
from qfedit.db import migrate
from qfedit.db.models import FactStatus
from qfedit.errors import InvalidInputError
from qfedit.hparams import parse_layers
from qfedit.pipeline import corpora
from qfedit.pipeline.preflight import check_runnable
from qfedit.pipeline.settings import ModelSettings, layers_label, merged, nested, validate_settings

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


def _settings_file(path: Path) -> dict[str, Any]:
    """Model settings from a TOML or JSON file; file names in it are taken from the file's folder."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
        loaded = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"--settings {path}: {error}", field="settings") from None
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"--settings {path}: expected a table of settings", field="settings")
    return _resolved_paths(loaded, path.parent)


_PATH_SETTINGS = ("preservation_corpus", "known_facts", "unknown_questions")


def _resolved_path(name: str, folder: Path) -> str:
    """A file name as typed, made absolute when it names a file from `folder` (the user's working
    directory, or a settings file's): a stored relative name would mean something else to a worker."""
    candidate = folder / name
    return str(candidate.resolve()) if candidate.exists() else name


def _resolved_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    resolved = dict(raw)
    for key in _PATH_SETTINGS:
        value = resolved.get(key)
        if isinstance(value, str):
            resolved[key] = _resolved_path(value, folder)
        elif isinstance(value, list):
            resolved[key] = [_resolved_path(v, folder) if isinstance(v, str) else v for v in value]
    return resolved


def checked_settings(raw: dict[str, Any], *, default_layer: int | None, source: str) -> ModelSettings:
    """Settings validated, and refused unless an edit can run with them (files parsed); warns when
    the evaluation sets are not held out from the preservation corpus."""
    validated = validate_settings(raw, default_layer=default_layer, field="settings")
    settings = get_settings()
    check_runnable(validated, source=source, app=settings, parse=True)
    if validated.known_facts or validated.unknown_questions:
        found = corpora.overlap(
            validated.corpus(),
            corpora.read_facts(validated.known_facts, "known_facts", settings),
            corpora.read_facts(validated.unknown_questions, "unknown_questions", settings),
            settings,
        )
        if not found["held_out"]:
            errors.print(
                f"[yellow]warning:[/yellow] the preservation corpus names {found['known_in_corpus']} "
                f"known and {found['unknown_in_corpus']} unknown evaluation facts: specificity and "
                "abstention will be in-sample, not held out (versions say so in their metrics)",
                highlight=False,
            )
    return validated


def _preset_settings(
    preset: str | None, settings_file: Path | None, model_dir: Path | None
) -> tuple[dict[str, Any], Path]:
    """`model add`'s settings before its options (the preset's, then the settings file's over
    them) and the model's directory: the one given, else the preset's; a GGUF file is converted
    once into the data folder, a Hugging Face directory the workers load."""
    raw: dict[str, Any] = {}
    directory = model_dir
    models_dir = get_settings().data_dir / "models"
    if preset is not None:
        chosen = presets.preset(preset)
        raw = nested(chosen.settings())
        directory = directory or chosen.model_dir(models_dir)
    if settings_file is not None:
        raw = merged(raw, nested(_settings_file(settings_file)))
    if directory is None:
        raise InvalidInputError("MODEL_DIR: give the model's directory or GGUF file", field="model_dir")
    if directory.is_file():
        from qfedit.gguf_model import convert_gguf

        directory = convert_gguf(
            directory, models_dir, progress=lambda line: errors.print(line, highlight=False)
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    return raw, directory


@model_app.command("add")
def model_add(
    name: str,
    model_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Directory holding the model's *.safetensors weights, or a GGUF file (converted once "
            "into the data folder); --preset names its own."
        ),
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Layer to edit (the top one with --layers).")
    ] = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Spread the edit over layers, e.g. 0-4 or 2,3,4.")
    ] = None,
    preserve: Annotated[
        list[Path] | None,
        typer.Option("--preserve", help="Preservation corpus file (repeatable): facts JSONL or text lines."),
    ] = None,
    known: Annotated[
        Path | None,
        typer.Option(
            "--known", help="Facts JSONL the model knows: specificity (and the corpus if no --preserve)."
        ),
    ] = None,
    unknown: Annotated[
        Path | None,
        typer.Option("--unknown", help="Facts JSONL about strangers it should not answer: abstention."),
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option("--rule", help="preserve (default; needs a corpus) or seed (QF's rule alone)."),
    ] = None,
    lam: Annotated[
        float | None, typer.Option("--lam", help="Weight of preservation against the edit.")
    ] = None,
    ridge: Annotated[
        float | None, typer.Option("--ridge", help="Ridge on the preservation covariance.")
    ] = None,
    settings_file: Annotated[
        Path | None,
        typer.Option("--settings", help="Settings from a TOML or JSON file (options override it)."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Named model and settings: "
            + "; ".join(f"{p.name}: {p.summary}" for p in presets.PRESETS.values()),
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision or commit.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a base model with the settings its batches are edited with; refused unless an edit can
    run with them (a corpus for the preserving rule, layers the model has, files that parse)."""
    from qfedit import registry

    def work(session: Session) -> None:
        raw, directory = _preset_settings(preset, settings_file, model_dir)
        edit: dict[str, Any] = dict(raw.get("edit") or {})
        if layers is not None:
            edit["layers"] = list(parse_layers(layers))
            edit.pop("layer", None)
        if layer is not None:
            edit["layer"] = layer
        solve = {k: v for k, v in {"rule": rule, "lam": lam, "ridge": ridge}.items() if v is not None}
        if solve:
            edit["solve"] = {**dict(edit.get("solve") or {}), **solve}
        if edit:
            raw["edit"] = edit
        cwd = Path.cwd()
        if preserve:
            raw["preservation_corpus"] = [_resolved_path(str(p), cwd) for p in preserve]
        if known is not None:
            raw["known_facts"] = _resolved_path(str(known), cwd)
        if unknown is not None:
            raw["unknown_questions"] = _resolved_path(str(unknown), cwd)
        source = str(directory.resolve())
        validated = checked_settings(raw, default_layer=layer, source=source)
        # Imported here: it pulls in torch, which only this command needs.
        from qfedit.modeling import weights_fingerprint

        fingerprint = weights_fingerprint(directory)
        model = registry.add_model(
            session,
            name=name,
            source=source,
            fingerprint=fingerprint,
            revision=revision,
            default_layer=validated.edit.layer,
            actor=current_actor(),
        )
        model.settings = validated.model_dump(mode="json", exclude_defaults=True)
        session.commit()
        if as_json:
            emit_json(views.model_out(model).model_dump(mode="json"))
        else:
            console.print(
                f"registered {model.name} (fingerprint {fingerprint[:16]}…), version {model.name}@0; "
                f"settings: qfedit model configure {model.name}",
                highlight=False,
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
        table = Table("name", "source", "layers", "fingerprint", "added")
        for m in models:
            table.add_row(
                m.name,
                m.source,
                layers_label(m.settings, m.default_layer),
                m.fingerprint[:16],
                when(m.created_at),
            )
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
                limits=get_settings().fact_limits,
            )
        if as_json:
            emit_json(summary.as_dict())
        else:
            table = Table(
                "read",
                "imported",
                "duplicates skipped",
                "superseded (older answers replaced)",
                "rejected",
                title=f"{file.name} → {model.name}",
            )
            counts = (
                summary.read,
                summary.imported,
                summary.duplicates,
                summary.superseded,
                summary.rejected,
            )
            table.add_row(*(str(n) for n in counts))
            console.print(table)
            for sample in summary.reject_samples:
                console.print(f"  rejected: {sample}", highlight=False)
            if summary.rejects_path:
                console.print(f"rejected records (fix and re-import): {summary.rejects_path}")
        if summary.stopped:
            errors.print(f"[red]stopped early:[/red] {summary.stopped}")
            raise typer.Exit(1)

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
                f.status.value + (f" (superseded by {f.superseded_by_id})" if f.superseded_by_id else ""),
                f.question,
                f.answer,
                f"{f.source}:{cell(f.source_line)}",
            )
        console.print(table)

    in_session(work)


@app.command("fact")
def fact_command(fact_id: int, as_json: JsonOption = False) -> None:
    """One fact and its history: status, what it supersedes or is superseded by, the versions that hold it."""
    from qfedit import registry

    def work(session: Session) -> None:
        detail = views.fact_detail(session, registry.get_fact(session, fact_id))
        if as_json:
            emit_json(detail.model_dump(mode="json"))
            return
        console.print(f"fact {detail.id} of {detail.model}: {detail.status}", highlight=False)
        console.print(f"  {detail.question} → {detail.answer}", highlight=False)
        console.print(f"  context: {detail.context}", highlight=False)
        console.print(
            f"  from {detail.source}:{cell(detail.source_line)} at {detail.created_at:%Y-%m-%d %H:%M}"
        )
        for older in detail.supersedes:
            previous = registry.get_fact(session, older)
            console.print(
                f"  supersedes fact {older} ({previous.answer}, {previous.status.value})", highlight=False
            )
        if detail.superseded_by is not None:
            newer = registry.get_fact(session, detail.superseded_by)
            console.print(
                f"  superseded by fact {newer.id} ({newer.answer}, {newer.status.value})", highlight=False
            )
        labels = ", ".join(v.label for v in detail.versions) or "none"
        console.print(f"  in versions: {labels}", highlight=False)

    in_session(work)


def _assign(target: dict[str, object], dotted: str, raw: str) -> None:
    """`solve.lam=10` sets target["solve"]["lam"] = 10; values are JSON when they parse as JSON.
    List settings also take commas (`preservation_corpus=a.jsonl,b.jsonl`, `layers=0-4`), and
    file names are made absolute when they name a file from the working directory."""
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise InvalidInputError(f"setting {dotted!r}: {key!r} is not a group")
        target = child
    leaf = keys[-1]
    value: object
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if leaf == "layers" and isinstance(value, str | int):
        value = list(parse_layers(str(value)))
    elif leaf == "preservation_corpus" and isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if leaf in _PATH_SETTINGS:
        value = _resolved_paths({leaf: value}, Path.cwd())[leaf]
    target[leaf] = value


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
        validated = checked_settings(current, default_layer=model.default_layer, source=model.source)
        if assignments:
            model.settings = validated.model_dump(mode="json", exclude_defaults=True)
            registry.record_audit(
                session,
                actor=current_actor(),
                action="model.configure",
                object_type="model",
                object_id=model.id,
                model_id=model.id,
                details={"settings": model.settings},
            )
            session.commit()
        shown = validated.model_dump(mode="json")
        if as_json:
            emit_json(shown)
            return
        console.print_json(data=shown)

    in_session(work)
