"""Commands that put a version in front of users: `qfedit serve` and `qfedit export`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from cli.app import app
from cli.common import console, in_session, model_or_none, ready_engine, user_errors
from cli.engine import ChatTemplate, fail, load, quiet_transformers
from qfedit.config import get_settings
from qfedit.errors import ConflictError, InvalidInputError
from qfedit.registry.aliases import PRODUCTION
from qfedit.store import store_from_settings


class ExportFormat(str, enum.Enum):
    full = "full"
    lora = "lora"


ModelDirOption = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        help="Base model directory, when not where it was registered from (its weights must match).",
        file_okay=False,
    ),
]


def _base_dir(source: str, override: Path | None) -> Path:
    base = override if override is not None else Path(source)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base}: no model directory there (registered source {source!r}); pass --model-dir"
        )
    return base


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


@app.command()
def serve(
    version_ref: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME@ALIAS|NAME@N]",
            help="What to serve: an alias, followed as it moves, or a pinned version.",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model", "-m", help="Registered model to serve (or NAME@ALIAS).")
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(help="Alias to follow as it moves (default production), or a version number."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    # Not the API's 8000: both run on one host in a small setup.
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8001,
    poll: Annotated[
        float, typer.Option("--poll", help="Look at the alias at most this often, in seconds.", min=0)
    ] = 5.0,
    model_dir: ModelDirOption = None,
    dtype: Annotated[str | None, typer.Option(help="Weights dtype (default: QFEDIT_DTYPE).")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device (default: QFEDIT_DEVICE).")] = None,
    chat_template: ChatTemplate = None,
) -> None:
    """Serve generation from NAME@ALIAS (switching versions between requests when the alias moves) or
    a pinned NAME@N: POST /generate, and OpenAI's POST /v1/chat/completions with model=NAME@ALIAS."""
    import uvicorn

    # Imported here: only this command needs FastAPI, and the engine never imports it.
    from api.serve import create_app
    from qfedit import registry
    from qfedit.db.engine import session_factory
    from qfedit.serving import follow_alias

    if version_ref is not None:
        if model_name is not None or alias is not None:
            raise fail("give NAME@ALIAS or --model/--alias, not both")
        model_name, _, alias = version_ref.partition("@")
    if not model_name:
        raise fail("what to serve: give NAME@ALIAS, NAME@N or --model NAME")
    alias = alias or PRODUCTION
    settings = get_settings()
    tokens = None
    if not _loopback(host):
        if not settings.api_tokens:
            raise fail(
                f"serving on {host}, beyond this machine, needs bearer tokens: set QFEDIT_API_TOKENS "
                "(any scope may generate), or listen on 127.0.0.1 behind a proxy that authenticates"
            )
        tokens = settings.api_tokens
    engine = ready_engine()
    sessions = session_factory(engine)
    try:
        with user_errors():
            with sessions() as session:
                source = registry.get_model(session, model_name).source
            base = _base_dir(source, model_dir)
            # A DeltaMismatchError (wrong base weights) is a ValueError: one red line, exit 1.
            loaded = load(base, dtype or settings.dtype, device or settings.device, chat_template)
            follower = follow_alias(
                loaded,
                sessions=sessions,
                store=store_from_settings(settings),
                model_name=model_name,
                alias=alias,
                poll_s=poll,
            )
        console.print(
            f"serving {model_name}@{alias} = {follower.versioned.version} on http://{host}:{port}"
            f" (alias checked at most every {poll:g} s)"
        )
        app = create_app(follower, tokens, max_body_bytes=settings.api_max_body_bytes)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.dispose()


@app.command("export")
def export_command(
    version_ref: Annotated[str, typer.Argument(metavar="VERSION", help="MODEL@N, MODEL@ALIAS, or N.")],
    out_dir: Annotated[Path, typer.Argument(help="New directory to write (must not exist or be empty).")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="full: merged model directory; lora: PEFT adapter.")
    ] = ExportFormat.full,
    rank: Annotated[
        int, typer.Option("--rank", help="LoRA: at most this rank (the update's own rank if lower).", min=1)
    ] = 64,
    model_name: Annotated[str | None, typer.Option("--model", "-m", help="Model name.")] = None,
    model_dir: ModelDirOption = None,
) -> None:
    """Write VERSION as a model directory transformers and vLLM load, or as a LoRA adapter."""
    from qfedit import export, registry
    from qfedit.architectures import architecture_for
    from qfedit.modeling import weights_fingerprint
    from qfedit.serving import load_version_delta

    quiet_transformers()

    def work(session: Session) -> None:
        version = registry.get_version(session, version_ref, model=model_or_none(session, model_name))
        model = version.model
        base = _base_dir(model.source, model_dir)
        mismatch = registry.base_mismatch(model, weights_fingerprint(base), str(base))
        if mismatch:
            raise ConflictError(mismatch)
        delta = load_version_delta(store_from_settings(get_settings()), version)
        info = {
            "version": version.label,
            "base_model": model.name,
            "base_fingerprint": model.fingerprint,
            "checkpoint_sha256": version.checkpoint_sha256,
        }
        if fmt is ExportFormat.full:
            export.export_full(base, delta, out_dir, info=info)
            merged = "the base itself" if delta is None else f"{len(delta.tensors)} tensor(s) merged"
            console.print(f"exported {version.label} to {out_dir} ({merged})")
            return
        if delta is None:
            raise InvalidInputError(
                f"{version.label} is the base model: no update to export as LoRA; use --format full"
            )
        architecture = architecture_for(export.model_type(base))
        report = export.export_lora(base, delta, architecture, out_dir, max_rank=rank, info=info)
        table = Table(
            "module", "numerical rank", "kept rank", "relative error", title=f"{version.label} LoRA"
        )
        for m in report.modules:
            table.add_row(m.module, str(m.numerical_rank), str(m.rank), f"{m.relative_error:.3e}")
        console.print(table)
        verdict = "exact" if report.exact else "[yellow]truncated[/yellow]"
        console.print(
            f"r = {report.rank}, {verdict}: |dW - BA| / |dW| = {report.relative_error:.3e}; written to {out_dir}"
        )

    in_session(work)
