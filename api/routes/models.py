"""Registered base models (`qfedit model add` registers them from weights on disk); their
description and tags are edited here."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ModelDep, ReadAccess, SessionDep, WriteAccess
from qfedit import registry
from qfedit.app.schemas import ERROR_RESPONSES, ModelOut, NotesPatch

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[ModelOut], summary="List base models")
def list_models(_: ReadAccess, session: SessionDep) -> list[ModelOut]:
    return [ModelOut.model_validate(m) for m in registry.list_models(session)]


@router.get("/{model}", response_model=ModelOut, summary="One base model")
def get_model(_: ReadAccess, model: ModelDep) -> ModelOut:
    return ModelOut.model_validate(model)


@router.patch("/{model}", response_model=ModelOut, summary="Change a model's description and tags (audited)")
def describe_model(
    principal: WriteAccess, session: SessionDep, model: ModelDep, body: NotesPatch
) -> ModelOut:
    registry.describe_model(
        session,
        model,
        actor=principal.name,
        **body.changes(),
    )
    session.commit()
    return ModelOut.model_validate(model)
