"""Small builders shared by the database tests."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.db import FactRow, Model
from qfedit.facts import Fact as FactRecord


def add_model(session: Session, name: str = "tiny", layer: int | None = 1) -> Model:
    """A model whose batches can be submitted: QF's rule alone needs no preservation corpus."""
    model = registry.add_model(
        session, name=name, source=f"/models/{name}", fingerprint="f" * 64, actor="alice", default_layer=layer
    )
    model.settings = {"edit": {"solve": {"rule": "seed"}}}
    return model


def add_facts(session: Session, model: Model, count: int, start: int = 0) -> list[int]:
    """Facts `Q{i}` -> `A{i}` for i in [start, start + count); returns their ids."""
    ids = []
    for i in range(start, start + count):
        record = FactRecord(question=f"Q{i}?", answer=f"A{i}", context=f"A{i} is the answer to Q{i}.")
        fact_id = session.execute(
            insert(FactRow)
            .values(
                model_id=model.id,
                content_hash=record.content_hash(),
                question=record.question,
                answer=record.answer,
                context=record.context,
                source="test",
                source_line=i,
            )
            .returning(FactRow.id)
        ).scalar_one()
        ids.append(fact_id)
    return ids
