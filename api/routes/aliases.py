"""Aliases: list, move with a reason (promote, roll back), history. Moving `production` needs admin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import ModelDep, ReadAccess, SessionDep, WriteAccess
from api.errors import ApiError
from qfedit import registry
from qfedit.app import views
from qfedit.app.schemas import ERROR_RESPONSES, NAME_PATTERN, AliasMoveOut, AliasMoveRequest, AliasOut
from qfedit.registry.aliases import ALIAS_PATTERN, PRODUCTION

router = APIRouter(prefix="/v1/models/{model}/aliases", tags=["aliases"])
# Moving (or creating) takes the alias rule; reading keeps the general one, so an alias named
# before the rule (`Production`) can still be read.
NewAliasName = Annotated[
    str, Path(pattern=ALIAS_PATTERN, description="Alias name: lowercase letters, digits, '_', '-'.")
]
AliasName = Annotated[str, Path(pattern=NAME_PATTERN, description="Alias name, e.g. production.")]
# Aliases that serve users: moving them is a release, so it takes an admin token.
ADMIN_ALIASES = frozenset({PRODUCTION})


@router.get("", response_model=list[AliasOut], summary="The model's aliases", responses=ERROR_RESPONSES)
def list_aliases(_: ReadAccess, session: SessionDep, model: ModelDep) -> list[AliasOut]:
    return [views.alias_out(a) for a in registry.list_aliases(session, model=model)]


@router.put(
    "/{name}", response_model=AliasOut, summary="Move (or create) an alias", responses=ERROR_RESPONSES
)
def move_alias(
    principal: WriteAccess, session: SessionDep, model: ModelDep, name: NewAliasName, body: AliasMoveRequest
) -> AliasOut:
    if name in ADMIN_ALIASES and not principal.allows("admin"):
        raise ApiError(403, f"moving {name!r} needs an admin token", field="path.name")
    version = registry.get_version(session, body.version, model=model)
    expect = body.expect_revision if "expect_revision" in body.model_fields_set else registry.UNSET
    alias = registry.set_alias(
        session, name=name, version=version, reason=body.reason, actor=principal.name, expect_revision=expect
    )
    session.commit()
    return views.alias_out(alias)


@router.get(
    "/{name}/history",
    response_model=list[AliasMoveOut],
    summary="Every move, oldest first",
    responses=ERROR_RESPONSES,
)
def alias_history(_: ReadAccess, session: SessionDep, model: ModelDep, name: AliasName) -> list[AliasMoveOut]:
    return [views.alias_move_out(m) for m in registry.alias_history(session, model, name)]
