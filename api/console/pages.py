"""The web console under `/ui`: read-only pages over the same data and scopes as the API.

Every `/ui/...` address answers the same page shell, which holds no data. Its script asks for a
token once, keeps it in `sessionStorage`, and fetches the page's HTML from `/ui/part/...` with
that token as a bearer header; those parts need `read` scope exactly as `/v1` routes do (same
dependency, same 401/403 bodies). No token travels in a URL and no cookie is set, so another
site cannot make a request act as the user.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from api.console import chart
from api.deps import ModelDep, ReadAccess, SessionDep
from api.errors import ApiError
from qfedit import registry
from qfedit.app.schemas import NAME_PATTERN, Moment, Text
from qfedit.db.models import Alias, BatchStatus, FactRow, Model
from qfedit.pipeline.lifecycle import batch_progress
from qfedit.pipeline.settings import layers_label
from qfedit.registry import history
from qfedit.registry.aliases import PRODUCTION

HERE = Path(__file__).parent
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
PAGE = 25  # rows per page of versions and batches
FACT_PAGE = 50  # rows per page of facts and audit entries
# Characters of a fact's text a page shows: a row of a list, the fact's own page. Longer text is
# cut, with a mark, when it is read.
ROW_CHARS = 300
FACT_CHARS = 20000

# The shell and parts load only from this origin; nothing may frame them.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "-"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:.4g}"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["when"] = _when
templates.filters["num"] = _number


def _html(template: str, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**context), headers=HEADERS)


PageQuery = Annotated[int, Query(ge=1, le=1_000_000, description="Page number, from 1.")]


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC:
        raise ApiError(404, f"no console file {name!r}", field="path.name")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name], headers=HEADERS)


@router.get("/part/models")
def models_part(_: ReadAccess, session: SessionDep) -> HTMLResponse:
    models = registry.list_models(session)
    heads = history.latest_versions(session, models)
    production = {
        alias.model_id: alias.version
        for alias in session.scalars(select(Alias).where(Alias.name == PRODUCTION))
    }
    rows = []
    for model in models:
        batches = history.recent_batches(session, model, limit=1)
        rows.append(
            {
                "model": model,
                "layers": layers_label(model.settings, model.default_layer),
                "head": heads.get(model.id),
                "production": production.get(model.id),
                "pending": history.status_counts(session, model)["pending"],
                "last_batch": batches[0] if batches else None,
            }
        )
    return _html("models.html", rows=rows)


def _batch_rows(session: SessionDep, model: Model) -> list[dict[str, Any]]:
    rows = []
    for batch in history.recent_batches(session, model, limit=10):
        progress = batch_progress(session, batch)
        version = registry.version_of_batch(session, batch)
        rows.append({"batch": batch, "progress": progress, "version": version})
    return rows


def _alias_rows(session: SessionDep, model: Model) -> list[dict[str, Any]]:
    return [
        {"alias": alias, "moves": registry.alias_history(session, model, alias.name)[::-1][:20]}
        for alias in registry.list_aliases(session, model=model)
    ]


@router.get("/part/models/{model}")
def model_part(_: ReadAccess, session: SessionDep, model: ModelDep, page: PageQuery = 1) -> HTMLResponse:
    versions, total = history.versions_page(session, model, limit=PAGE, offset=(page - 1) * PAGE)
    aliases = registry.aliases_by_version(session, model)
    series = history.metric_series(session, model)
    active = {BatchStatus.QUEUED, BatchStatus.CAPTURING, BatchStatus.SOLVING}
    batches = _batch_rows(session, model)
    return _html(
        "model.html",
        model=model,
        layers=layers_label(model.settings, model.default_layer),
        counts=history.status_counts(session, model),
        versions=versions,
        aliases=aliases,
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE)),
        chart=chart.quality_chart(series),
        alias_rows=_alias_rows(session, model),
        batches=batches,
        busy=any(row["batch"].status in active for row in batches),
    )


@router.get("/part/models/{model}/batches")
def batches_part(_: ReadAccess, session: SessionDep, model: ModelDep) -> HTMLResponse:
    return _html("batches.html", model=model, batches=_batch_rows(session, model))


@router.get("/part/models/{model}/aliases")
def aliases_part(_: ReadAccess, session: SessionDep, model: ModelDep) -> HTMLResponse:
    return _html("aliases.html", model=model, alias_rows=_alias_rows(session, model))


@router.get("/part/models/{model}/versions/{number}")
def version_part(
    _: ReadAccess,
    session: SessionDep,
    request: Request,
    model: ModelDep,
    number: int,
    show: Annotated[
        history.DiffKind | None,
        Query(description="Which side of the diff to list; default: the first that has facts."),
    ] = None,
    page: PageQuery = 1,
) -> HTMLResponse:
    version = registry.get_version(session, str(number), model=model)
    counts = history.diff_counts(session, version)
    kinds: tuple[history.DiffKind, ...] = ("added", "retracted", "superseded")
    # A retraction adds nothing: it opens on what it took out, not on "added: 0".
    first: history.DiffKind = next((kind for kind in kinds if counts[kind]), "added")
    shown: history.DiffKind = show if show is not None else first
    rows = history.diff_page(session, version, shown, limit=FACT_PAGE, offset=(page - 1) * FACT_PAGE)
    metrics = {k: v for k, v in (version.metrics or {}).items() if isinstance(v, int | float)}
    protocol = (version.metrics or {}).get("protocol") or {}
    edit = (version.hyperparameters or {}).get("edit") or {}  # the batch's validated settings
    return _html(
        "version.html",
        model=model,
        version=version,
        aliases=registry.aliases_by_version(session, model).get(version.id, []),
        counts=counts,
        show=shown,
        rows=rows,
        page=page,
        pages=max(1, -(-counts[shown] // FACT_PAGE)),
        metrics=metrics,
        held_out=protocol.get("held_out"),
        layers=edit.get("layers") or [version.layer],
        origin=str(request.base_url).rstrip("/"),
    )


@router.get("/part/facts")
def search_part(
    _: ReadAccess,
    session: SessionDep,
    q: Annotated[Text | None, Query(max_length=500, description="Text, id or external id.")] = None,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    page: PageQuery = 1,
) -> HTMLResponse:
    chosen = registry.get_model(session, model) if model else None
    rows: list[registry.FactPreview] = []
    more = False
    if q:
        rows, more = history.search_facts(
            session, q, model=chosen, limit=FACT_PAGE, offset=(page - 1) * FACT_PAGE, chars=ROW_CHARS
        )
    return _html(
        "search.html",
        q=q or "",
        model=model or "",
        models=registry.list_models(session),
        rows=rows,
        page=page,
        more=more,
    )


@router.get("/part/facts/{fact_id}")
def fact_part(_: ReadAccess, session: SessionDep, fact_id: int) -> HTMLResponse:
    # Its text read no further than the page shows (a fact imported before facts had size limits
    # may hold megabytes); the API's /v1/facts/ID has it whole.
    found = registry.fact_previews(session, [fact_id], chars=FACT_CHARS)
    text = found[0] if found else None
    fact = text.row if text is not None else registry.get_fact(session, fact_id)
    supersedes = list(session.scalars(select(FactRow.id).where(FactRow.superseded_by_id == fact.id)))
    return _html(
        "fact.html",
        fact=fact,
        text=text,
        ranges=history.version_ranges(session, fact),
        batches=history.fact_batches(session, fact),
        supersedes=supersedes,
    )


@router.get("/part/audit")
def audit_part(
    _: ReadAccess,
    session: SessionDep,
    request: Request,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    actor: Annotated[Text | None, Query(max_length=200)] = None,
    action: Annotated[Text | None, Query(max_length=64, description="Prefix, e.g. `alias`.")] = None,
    since: Annotated[Moment | None, Query(description="At or after; UTC if no zone.")] = None,
    until: Annotated[Moment | None, Query(description="Before; UTC if no zone.")] = None,
    before: Annotated[int | None, Query(ge=1, description="Entries older than this entry id.")] = None,
) -> HTMLResponse:
    chosen = registry.get_model(session, model) if model else None
    entries = registry.list_audit(
        session,
        model=chosen,
        actor=actor or None,
        action=action or None,
        since=since,
        until=until,
        before=before,
        limit=FACT_PAGE + 1,
    )
    more = len(entries) > FACT_PAGE
    entries = entries[:FACT_PAGE]
    older = None
    if more:
        query = dict(request.query_params)
        query["before"] = str(entries[-1].id)
        older = "/ui/audit?" + "&".join(f"{k}={v}" for k, v in _encoded(query))
    return _html(
        "audit.html",
        entries=entries,
        names=registry.object_names(session, entries),
        models=registry.list_models(session),
        filters={
            "model": model or "",
            "actor": actor or "",
            "action": action or "",
            "since": request.query_params.get("since", ""),
            "until": request.query_params.get("until", ""),
        },
        older=older,
    )


def _encoded(query: dict[str, str]) -> list[tuple[str, str]]:
    from urllib.parse import quote

    return [(quote(k, safe=""), quote(v, safe="")) for k, v in query.items()]


@router.get("/part/{rest:path}")
def unknown_part(_: ReadAccess, rest: str) -> HTMLResponse:
    raise ApiError(404, f"the console has no page /ui/{rest}", field="path")


@router.get("")
@router.get("/{rest:path}")
def shell(rest: str = "") -> HTMLResponse:
    """The same shell for every console address; the script loads what the address names."""
    return _html("shell.html")
