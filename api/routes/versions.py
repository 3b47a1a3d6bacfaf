"""Versions: list, show, diff, and download of the delta file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from api.deps import ModelDep, ReadAccess, SessionDep, StoreDep, WriteAccess
from api.errors import ApiError
from qfedit import registry
from qfedit.app import views
from qfedit.app.schemas import (
    ERROR_RESPONSES,
    VersionDetail,
    VersionDiffOut,
    VersionOut,
    VersionPatch,
    VersionRef,
)

router = APIRouter(prefix="/v1/models/{model}", tags=["versions"])
RefPath = Annotated[VersionRef, Path(description="A version number or an alias.")]


@router.get(
    "/versions",
    response_model=list[VersionOut],
    summary="Every version of the model",
    responses=ERROR_RESPONSES,
)
def list_versions(
    _: ReadAccess,
    session: SessionDep,
    model: ModelDep,
    archived: Annotated[bool, Query(description="Include archived versions.")] = False,
) -> list[VersionOut]:
    aliases = registry.aliases_by_version(session, model)
    found = registry.list_versions(session, model=model, archived=archived)
    return [views.version_out(v, aliases.get(v.id, [])) for v in found]


@router.patch(
    "/versions/{ref}",
    response_model=VersionDetail,
    summary="Change a version's description and tags, archive or restore it (audited)",
    responses=ERROR_RESPONSES,
)
def change_version(
    principal: WriteAccess, session: SessionDep, model: ModelDep, ref: RefPath, body: VersionPatch
) -> VersionDetail:
    version = registry.get_version(session, ref, model=model)
    registry.describe_version(
        session,
        version,
        actor=principal.name,
        **body.changes(),
    )
    if body.archived is not None:
        registry.archive_version(
            session, version, actor=principal.name, reason=body.reason or "", archived=body.archived
        )
    session.commit()
    session.refresh(version)
    return views.version_detail(session, version)


@router.get(
    "/versions/{ref}", response_model=VersionDetail, summary="One version in full", responses=ERROR_RESPONSES
)
def show_version(_: ReadAccess, session: SessionDep, model: ModelDep, ref: RefPath) -> VersionDetail:
    return views.version_detail(session, registry.get_version(session, ref, model=model))


@router.get(
    "/diff",
    response_model=VersionDiffOut,
    summary="What changed between two versions",
    responses=ERROR_RESPONSES,
)
def diff_versions(
    _: ReadAccess,
    session: SessionDep,
    store: StoreDep,
    model: ModelDep,
    old: Annotated[VersionRef, Query(alias="from")],
    new: Annotated[VersionRef, Query(alias="to")],
    limit: Annotated[int, Query(ge=0, le=10_000, description="At most this many facts of each side.")] = 1000,
) -> VersionDiffOut:
    first = registry.get_version(session, old, model=model)
    second = registry.get_version(session, new, model=model)
    diff = registry.diff_versions(session, first, second, store=store)
    return views.diff_out(diff, limit)


@router.get(
    "/versions/{ref}/delta",
    response_class=FileResponse,
    summary="Download the version's delta (safetensors)",
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **ERROR_RESPONSES,
    },
)
def download_delta(
    _: ReadAccess, session: SessionDep, store: StoreDep, model: ModelDep, ref: RefPath
) -> FileResponse:
    version = registry.get_version(session, ref, model=model)
    if version.checkpoint_path is None or version.checkpoint_sha256 is None:
        raise ApiError(404, f"{version.label} is the base model; it has no delta", field="path.ref")
    # Verified before sending, so a corrupt file is an error rather than a silent bad download.
    path = store.verified_local_file(version.checkpoint_path, version.checkpoint_sha256)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{model.name}-{version.number}.safetensors",
        headers={"ETag": f'"{version.checkpoint_sha256}"', "X-Checkpoint-SHA256": version.checkpoint_sha256},
    )
