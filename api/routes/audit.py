"""The audit log: who did what, when, and why."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ReadAccess, SessionDep
from qfedit import registry
from qfedit.app.schemas import ERROR_RESPONSES, NAME_PATTERN, AuditOut, Moment, Text

router = APIRouter(tags=["audit"])


@router.get(
    "/v1/audit",
    response_model=list[AuditOut],
    summary="Audit entries, newest first",
    responses=ERROR_RESPONSES,
)
def list_audit(
    _: ReadAccess,
    session: SessionDep,
    actor: Annotated[Text | None, Query(max_length=200)] = None,
    action: Annotated[Text | None, Query(max_length=64, description="Prefix, e.g. `alias`.")] = None,
    object_type: Annotated[Text | None, Query(max_length=32)] = None,
    object_id: Annotated[Text | None, Query(max_length=64)] = None,
    since: Annotated[Moment | None, Query(description="At or after; UTC if no zone.")] = None,
    until: Annotated[Moment | None, Query(description="Before; UTC if no zone.")] = None,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN, description="Entries about this model.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditOut]:
    entries = registry.list_audit(
        session,
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        since=since,
        until=until,
        model=registry.get_model(session, model) if model else None,
        limit=limit,
    )
    return [AuditOut.model_validate(e) for e in entries]
