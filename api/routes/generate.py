"""Generation for spot checks, pinned to a version or alias (default `production`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import ModelDep, ReadAccess, SessionDep, StoreDep
from api.errors import ApiError
from api.generation import ModelUnavailableError
from qfedit import registry
from qfedit.app.schemas import ERROR_RESPONSES, GenerateRequest, GenerateResponse
from qfedit.serving import PromptTooLongError

router = APIRouter(tags=["generation"])


@router.post(
    "/v1/models/{model}/generate",
    response_model=GenerateResponse,
    summary="Answer a question with a version's weights",
    responses=ERROR_RESPONSES,
)
def generate(
    request: Request,
    _: ReadAccess,
    session: SessionDep,
    store: StoreDep,
    model: ModelDep,
    body: GenerateRequest,
) -> GenerateResponse:
    limit = request.app.state.settings.api_max_prompt_chars
    for name, value in (("question", body.question), ("context", body.context or "")):
        if len(value) > limit:
            raise ApiError(
                422, f"{name} is {len(value)} characters; the limit is {limit}", field=f"body.{name}"
            )
    version = registry.get_version(session, body.version, model=model)
    try:
        reply = request.app.state.generators.answer(
            model, version, store, body.question, body.context, max_new_tokens=body.max_new_tokens
        )
    except PromptTooLongError as err:
        raise ApiError(422, str(err), field=f"body.{err.field}") from None
    except ModelUnavailableError as err:
        raise ApiError(503, str(err), code="model_unavailable") from None
    return GenerateResponse(model=model.name, version=reply.version, number=version.number, answer=reply.text)
