"""JSON-ready views of rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qfedit.db.models import (
    FactRow,
    Version,
)


def describe_version(version: Version, aliases: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON-ready view of a version, for the CLI's `--json` and the API."""
    return {
        "id": version.id,
        "model": version.model.name,
        "number": version.number,
        "label": version.label,
        "parent": version.parent.number if version.parent is not None else None,
        "batch": version.batch_id,
        "created_at": version.created_at.isoformat(),
        "created_by": version.created_by,
        "reason": version.reason,
        "layer": version.layer,
        "rule": version.rule,
        "hyperparameters": version.hyperparameters,
        "relative_update_norm": version.relative_update_norm,
        "metrics": version.metrics,
        "fact_count": version.fact_count,
        "fact_set_digest": version.fact_set_digest,
        "checkpoint_path": version.checkpoint_path,
        "checkpoint_sha256": version.checkpoint_sha256,
        "aliases": list(aliases),
    }


def describe_fact(fact: FactRow) -> dict[str, Any]:
    return {
        "id": fact.id,
        "model_id": fact.model_id,
        "external_id": fact.external_id,
        "question": fact.question,
        "answer": fact.answer,
        "context": fact.context,
        "subject": fact.subject,
        "significance": fact.significance,
        "paraphrases": fact.paraphrases,
        "neighbors": fact.neighbors,
        "status": fact.status.value,
        "source": fact.source,
        "source_line": fact.source_line,
        "content_hash": fact.content_hash,
        "created_at": fact.created_at.isoformat(),
    }
