"""Shared by the deploy tests: the example environment, variable substitution, the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENV_EXAMPLE = DEPLOY / ".env.example"


def example_environment() -> dict[str, str]:
    """The variables `.env.example` sets (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def substitute(text: str, values: dict[str, str]) -> str:
    """`${NAME}`, `${NAME:-default}`, `${NAME:?message}` as compose and systemd expand them."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in values:
            return values[name]
        if default is None or match.group(0).startswith(f"${{{name}:?"):
            raise KeyError(f"{match.group(0)} has no value in {ENV_EXAMPLE.name}")
        return default

    return _VARIABLE.sub(one, text)


def run_help(argv: list[str]) -> tuple[int, str]:
    """Run `qfedit ARGV --help` in this process (the same click command the console script runs).

    Click rejects an unknown command or option even with --help, so exit 0 means every word of
    ARGV is one the CLI has.
    """
    from cli import get_app

    result = CliRunner().invoke(get_app(), [*argv, "--help"])
    return result.exit_code, result.output


def split(command: str) -> list[str]:
    return shlex.split(command)
