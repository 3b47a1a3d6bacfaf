"""Facts: streamed bulk import with per-line rejects, list and filter, one fact, retraction."""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, status
from starlette.concurrency import run_in_threadpool

from api import queue
from api.deps import IdempotencyKey, ModelDep, ReadAccess, SessionDep, WriteAccess
from api.errors import ApiError
from qfedit import importing, registry
from qfedit.app import views
from qfedit.app.schemas import (
    DB_INT_MAX,
    ERROR_RESPONSES,
    NAME_PATTERN,
    BatchOut,
    DbId,
    FactDetail,
    FactOut,
    FactPage,
    ImportReject,
    ImportResult,
    RetractRequest,
    Text,
)
from qfedit.db.models import FactStatus
from qfedit.pipeline import submit

router = APIRouter(tags=["facts"])

IMPORT_PATH = re.compile(r"^/v1/models/[^/]+/facts/import$")
_MEDIA_TYPES = {
    "application/x-ndjson": importing.Format.JSONL,
    "application/jsonl": importing.Format.JSONL,
    "text/csv": importing.Format.CSV,
}
# Written to disk in blocks this big, off the event loop.
_WRITE_BLOCK = 1 << 20
LIST_BUDGET_CHARS = 8 << 20
"""About how many characters of fact text one page of a fact list holds at most."""
_PREVIEW_BATCH = 100  # facts read at a time while a page fills its budget
REJECT_RECORD_CHARS = 1 << 16


def _upload_format(explicit: importing.Format | None, content_type: str | None) -> importing.Format:
    if explicit is not None:
        return explicit
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _MEDIA_TYPES:
        return _MEDIA_TYPES[media]
    raise ApiError(
        415,
        f"cannot tell the format from Content-Type {media or '(none)'!r}: send application/x-ndjson or "
        "text/csv, or pass ?format=jsonl|csv|counterfact|zsre|rejects",
        field="query.format",
    )


async def _save_body(request: Request, path: Path) -> None:
    """Stream the request body to `path` without holding it in memory."""
    with path.open("wb") as out:
        block = bytearray()
        async for chunk in request.stream():
            block += chunk
            if len(block) >= _WRITE_BLOCK:
                await anyio.to_thread.run_sync(out.write, bytes(block))
                block.clear()
        await anyio.to_thread.run_sync(out.write, bytes(block))


def _read_rejects(path: Path | None, limit: int) -> list[ImportReject]:
    """The first `limit` rejects, as many as `LIST_BUDGET_CHARS` holds; a record longer than
    `REJECT_RECORD_CHARS` is sent as the start of its JSON text."""
    if path is None:
        return []
    found: list[ImportReject] = []
    chars = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            size = min(len(line), REJECT_RECORD_CHARS)
            if len(found) >= limit or (found and chars + size > LIST_BUDGET_CHARS):
                break
            chars += size
            entry = json.loads(line)
            if len(line) > REJECT_RECORD_CHARS:
                shown = json.dumps(entry["record"], ensure_ascii=False)
                entry["record"] = shown[:REJECT_RECORD_CHARS] + f"… ({len(shown)} characters in all)"
            try:
                json.dumps(entry["record"], ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate cannot go out as UTF-8 JSON; send the record as escaped JSON text.
                entry["record"] = json.dumps(entry["record"])
            found.append(ImportReject.model_validate({k: entry[k] for k in ImportReject.model_fields}))
    return found


@router.post(
    "/v1/models/{model}/facts/import",
    response_model=ImportResult,
    summary="Import facts from an NDJSON or CSV body, streamed",
    description="Each line is validated on its own: bad ones come back in `rejects` with their line "
    "number and reason, the rest are imported. Facts already stored (same content) are skipped, so "
    "re-sending a file imports nothing twice.",
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("application/x-ndjson", "text/csv", "application/octet-stream")
            },
        }
    },
)
async def import_facts(
    request: Request,
    principal: WriteAccess,
    model: ModelDep,
    session: SessionDep,
    fmt: Annotated[
        importing.Format | None, Query(alias="format", description="Default: from Content-Type.")
    ] = None,
    source: Annotated[
        str, Query(pattern=NAME_PATTERN, description="Corpus name recorded as each fact's source.")
    ] = "api-upload",
    max_rejects: Annotated[
        int, Query(ge=0, le=10_000, description="At most this many rejects listed.")
    ] = 1000,
) -> ImportResult:
    fmt = _upload_format(fmt, request.headers.get("content-type"))
    # The body goes to a fixed name in a folder of its own: `source` is only the facts' label,
    # so no caller's name can point the import at its own rejects file or anywhere else.
    with tempfile.TemporaryDirectory(prefix="qfedit-upload-") as tmp:
        path = Path(tmp) / "upload" / "body"
        path.parent.mkdir()
        await _save_body(request, path)
        try:
            summary = await run_in_threadpool(
                importing.import_facts,
                session,
                path,
                model,
                fmt=fmt,
                actor=principal.name,
                rejects_path=Path(tmp) / "rejects" / "rejects.jsonl",
                source=source,
                rejects_label="returned in the response",
                limits=request.app.state.settings.fact_limits,
            )
        except (UnicodeDecodeError, csv.Error) as err:
            # The CSV and JSON-array readers decode as they go; an undecodable file stops there.
            raise ApiError(422, f"the body cannot be read as {fmt.value}: {err}", field="body") from None
        rejects = _read_rejects(summary.rejects_path, max_rejects)
    return ImportResult(
        model=model.name,
        source=source,
        format=fmt.value,
        read=summary.read,
        imported=summary.imported,
        duplicates=summary.duplicates,
        rejected=summary.rejected,
        stopped=summary.stopped,
        rejects=rejects,
        rejects_truncated=summary.rejected > len(rejects),
    )


@router.get("/v1/facts", response_model=FactPage, summary="List and filter facts", responses=ERROR_RESPONSES)
def list_facts(
    _: ReadAccess,
    session: SessionDep,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    fact_status: Annotated[FactStatus | None, Query(alias="status")] = None,
    source: Annotated[Text | None, Query(max_length=500)] = None,
    q: Annotated[
        Text | None,
        Query(
            max_length=500,
            description="Substring of question, answer, context or subject (of their first 65,536 "
            "characters), any case.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
) -> FactPage:
    ids = registry.list_fact_ids(
        session,
        model=registry.get_model(session, model) if model else None,
        status=fact_status,
        source=source,
        text=q,
        limit=limit,
        offset=offset,
    )
    # Each fact's text is cut in the database to a preview (named in its `truncated`), and the page
    # ends once it holds `LIST_BUDGET_CHARS`: a list of long facts costs what a list of short ones does.
    items: list[FactOut] = []
    chars = 0
    for start in range(0, len(ids), _PREVIEW_BATCH):
        for preview in registry.fact_previews(session, ids[start : start + _PREVIEW_BATCH]):
            if items and chars + preview.chars > LIST_BUDGET_CHARS:
                return FactPage(items=items, limit=limit, offset=offset, next_offset=offset + len(items))
            items.append(views.fact_preview_out(preview))
            chars += preview.chars
    return FactPage(items=items, limit=limit, offset=offset)


@router.get(
    "/v1/facts/{fact_id}",
    response_model=FactDetail,
    summary="One fact and the versions holding it",
    responses=ERROR_RESPONSES,
)
def get_fact(_: ReadAccess, session: SessionDep, fact_id: DbId) -> FactDetail:
    return views.fact_detail(session, registry.get_fact(session, fact_id))


@router.post(
    "/v1/models/{model}/facts/retract",
    response_model=BatchOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Retract facts: queue a batch that removes them from the next version",
    responses=ERROR_RESPONSES,
)
def retract_facts(
    request: Request,
    principal: WriteAccess,
    model: ModelDep,
    session: SessionDep,
    body: RetractRequest,
    idempotency_key: IdempotencyKey = None,
) -> BatchOut:
    settings = request.app.state.settings
    if len(body.fact_ids) > settings.api_max_batch_facts:
        raise ApiError(422, f"at most {settings.api_max_batch_facts} facts a request", field="body.fact_ids")
    batch = submit.submit_retraction(
        session,
        model=model,
        fact_ids=body.fact_ids,
        reason=body.reason,
        requested_by=principal.name,
        idempotency_key=idempotency_key,
    )
    session.commit()
    queue.send(request, batch)
    return views.batch_out(session, batch)
