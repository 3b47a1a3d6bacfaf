"""Models, versions, aliases, batches and the audit log through the library functions."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.db import BatchStatus, FactStatus, Version
from qfedit.delta import Delta
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact as FactRecord
from qfedit.facts import fact_set_digest
from qfedit.pipeline import lifecycle
from qfedit.store import LocalStore

from .helpers import add_facts, add_model


def _version(session: Session, model: object, fact_ids: list[int], **kwargs: object) -> Version:
    defaults: dict[str, object] = {
        "created_by": "alice",
        "reason": "test",
        "checkpoint": None,
        "layer": 1,
        "rule": "seed",
    }
    defaults.update(kwargs)
    return registry.record_version(session, model=model, fact_ids=fact_ids, **defaults)  # type: ignore[arg-type]


def test_add_model_registers_base_version_and_unknown_names_list_the_registered(session: Session) -> None:
    model = add_model(session, "alpha")
    add_model(session, "beta")
    base = registry.get_version(session, "alpha@0")
    assert (base.model_id, base.number, base.checkpoint_path, base.fact_count) == (model.id, 0, None, 0)
    with pytest.raises(registry.NotFoundError, match=r"no model named 'gamma' \(registered: alpha, beta\)"):
        registry.get_model(session, "gamma")
    with pytest.raises(registry.ConflictError, match="already registered"):
        add_model(session, "alpha")
    with pytest.raises(ValueError, match="model name 'a@b'"):
        add_model(session, "a@b")


def test_base_mismatch_accepts_only_the_registered_weights(session: Session) -> None:
    model = add_model(session, "alpha")
    assert registry.base_mismatch(model, model.fingerprint, "/models/alpha") is None
    why = registry.base_mismatch(model, "0" * 64, "/models/other")
    assert why is not None
    assert all(part in why for part in ("'alpha'", model.fingerprint, "/models/other", "0" * 64))


def test_versions_count_up_per_model_and_keep_their_fact_sets(session: Session) -> None:
    alpha, beta = add_model(session, "alpha"), add_model(session, "beta")
    facts = add_facts(session, alpha, 3)
    other = add_facts(session, beta, 1, start=10)
    v1 = _version(session, alpha, facts[:2])
    v2 = _version(session, alpha, facts)
    w1 = _version(session, beta, other)
    assert (v1.number, v2.number, w1.number) == (1, 2, 1)
    assert v2.parent_id == v1.id and v1.parent is not None and v1.parent.number == 0
    assert registry.version_fact_ids(session, v2) == set(facts)
    records = [
        FactRecord(question=f"Q{i}?", answer=f"A{i}", context=f"A{i} is the answer to Q{i}.")
        for i in range(3)
    ]
    assert v2.fact_set_digest == fact_set_digest(records)
    with pytest.raises(registry.NotFoundError, match="facts not found for model 'alpha'"):
        _version(session, alpha, [other[0]])
    with pytest.raises(ValueError, match="needs a reason"):
        _version(session, alpha, facts, reason="  ")


def test_diff_reports_facts_metrics_and_weight_difference(session: Session, tmp_path: object) -> None:
    store = LocalStore(tmp_path / "store")  # type: ignore[operator]
    model = add_model(session)
    facts = add_facts(session, model, 3)
    d1 = {"layers.1.down_proj.weight": torch.ones(2, 3)}
    d2 = {
        "layers.1.down_proj.weight": torch.ones(2, 3) * 3,
        "layers.2.down_proj.weight": torch.full((1, 4), 2.0),
    }
    v1 = _version(
        session,
        model,
        facts[:2],
        checkpoint=store.put_bytes(Delta(d1, model.fingerprint).to_bytes()),
        metrics={"acc": 0.5, "keep": 0.9},
    )
    v2 = _version(
        session,
        model,
        facts[1:],
        checkpoint=store.put_bytes(Delta(d2, model.fingerprint).to_bytes()),
        metrics={"acc": 0.75, "keep": 0.9},
    )
    diff = registry.diff_versions(session, v1, v2, store=store)
    assert [f.id for f in diff.added] == [facts[2]]
    assert [f.id for f in diff.removed] == [facts[0]]
    assert diff.metric_changes == {"acc": (0.5, 0.75)}
    # |(3-1) * ones(2,3)|^2 + |2 * ones(1,4)|^2 = 24 + 16
    assert diff.weight_difference_norm == pytest.approx(40**0.5)
    base = registry.get_version(session, "tiny@0")
    assert registry.diff_versions(session, base, v1, store=store).weight_difference_norm == pytest.approx(
        6**0.5
    )


def test_alias_moves_are_compare_and_set_and_kept_in_history(session: Session) -> None:
    model = add_model(session)
    facts = add_facts(session, model, 2)
    v1, v2 = _version(session, model, facts[:1]), _version(session, model, facts)
    alias = registry.set_alias(session, name="production", version=v1, reason="first", actor="alice")
    assert alias.revision == 1
    registry.set_alias(
        session, name="production", version=v2, reason="more facts", actor="bob", expect_revision=1
    )
    with pytest.raises(registry.ConflictError, match="at revision 2, not 1"):
        registry.set_alias(
            session, name="production", version=v1, reason="stale", actor="carol", expect_revision=1
        )
    with pytest.raises(registry.ConflictError, match="already exists"):
        registry.set_alias(
            session, name="production", version=v1, reason="create", actor="carol", expect_revision=None
        )
    # Rolling back is a move to the older version; the version itself is untouched.
    registry.set_alias(
        session, name="production", version=v1, reason="rollback", actor="bob", expect_revision=2
    )
    session.commit()
    assert registry.get_version(session, "tiny@production").id == v1.id
    history = registry.alias_history(session, model, "production")
    assert [(m.from_version_id, m.to_version_id, m.moved_by, m.reason) for m in history] == [
        (None, v1.id, "alice", "first"),
        (v1.id, v2.id, "bob", "more facts"),
        (v2.id, v1.id, "bob", "rollback"),
    ]
    assert registry.get_alias(session, model, "production").revision == 3
    entries = registry.list_audit(session, action="alias")
    assert [e.details["to"] for e in entries] == [1, 2, 1]  # newest first
    with pytest.raises(ValueError, match="needs a reason"):
        registry.set_alias(session, name="production", version=v2, reason="", actor="bob")


LOOK_ALIKES = ["Production", "PRODUCTION", "production.", "production\n", " production", "pro duction",
               "_production", "production@2", "\uff50roduction", "p" * 65, ""]  # fmt: skip


def test_look_alike_alias_names_are_refused(session: Session) -> None:
    """The attack: `Production` (or `PRODUCTION`, `production.`) created beside `production`."""
    model = add_model(session)
    version = _version(session, model, add_facts(session, model, 1))
    registry.set_alias(session, name="production", version=version, reason="release", actor="alice")
    for look_alike in LOOK_ALIKES:
        with pytest.raises(InvalidInputError, match=r"^alias name .*lowercase"):
            registry.set_alias(session, name=look_alike, version=version, reason="confuse", actor="mallory")
    for fine in ("staging", "canary-2", "eval_b", "p" * 64):
        registry.set_alias(session, name=fine, version=version, reason="ok", actor="alice")
    session.commit()
    assert [a.name for a in registry.list_aliases(session, model=model)] == sorted(
        ["production", "staging", "canary-2", "eval_b", "p" * 64]
    )


def test_a_lost_race_on_an_alias_raises_instead_of_overwriting(engine: object, session: Session) -> None:
    from qfedit.db import session_factory

    model = add_model(session)
    facts = add_facts(session, model, 2)
    v1, v2 = _version(session, model, facts[:1]), _version(session, model, facts)
    registry.set_alias(session, name="production", version=v1, reason="first", actor="alice")
    session.commit()
    stale = registry.get_alias(session, model, "production")  # read at revision 1
    with session_factory(engine)() as other:  # type: ignore[arg-type]
        registry.set_alias(
            other, name="production", version=v2, reason="other", actor="bob", expect_revision=1
        )
        other.commit()
    assert stale.revision == 1  # this session still believes revision 1
    with pytest.raises(registry.ConflictError, match="moved concurrently"):
        registry.set_alias(
            session,
            name="production",
            version=registry.get_version(session, "tiny@0"),
            reason="mine",
            actor="alice",
        )


def test_batches_follow_the_lifecycle_and_idempotency_keys(session: Session) -> None:
    model = add_model(session)
    facts = add_facts(session, model, 3)
    batch = registry.create_batch(
        session, model=model, fact_ids=facts, requested_by="alice", idempotency_key="k1"
    )
    again = registry.create_batch(
        session, model=model, fact_ids=reversed(facts), requested_by="alice", idempotency_key="k1"
    )
    assert again.id == batch.id
    with pytest.raises(registry.ConflictError, match="already used"):
        registry.create_batch(
            session, model=model, fact_ids=facts[:1], requested_by="alice", idempotency_key="k1"
        )
    for status in (BatchStatus.CAPTURING, BatchStatus.CAPTURING, BatchStatus.SOLVING, BatchStatus.EVALUATING):
        lifecycle.transition_batch(session, batch, status, actor="worker")
    assert batch.attempts == 1  # re-entering capturing (a redelivered task) is not a new attempt
    with pytest.raises(lifecycle.InvalidTransitionError, match="from evaluating to queued"):
        lifecycle.transition_batch(session, batch, BatchStatus.QUEUED, actor="worker")
    lifecycle.transition_batch(session, batch, BatchStatus.PUBLISHED, actor="worker")
    assert batch.progress == 1.0 and batch.finished_at is not None
    with pytest.raises(lifecycle.InvalidTransitionError, match="none \\(final\\)"):
        lifecycle.transition_batch(session, batch, BatchStatus.FAILED, actor="worker")
    session.commit()
    assert registry.get_batch(session, batch.id).status == BatchStatus.PUBLISHED
    assert registry.batch_fact_ids(session, batch) == sorted(facts)


def test_fact_status_and_audit_filters(session: Session) -> None:
    model = add_model(session)
    facts = add_facts(session, model, 3)
    assert registry.set_fact_status(session, facts[:2], FactStatus.APPLIED, actor="w", reason="v1") == 2
    assert registry.set_fact_status(session, facts[:2], FactStatus.APPLIED, actor="w", reason="v1") == 0
    session.commit()
    assert [f.id for f in registry.list_facts(session, model=model, status=FactStatus.APPLIED)] == facts[:2]
    assert registry.count_facts(session, model=model) == {"applied": 2, "pending": 1}
    assert [e.action for e in registry.list_audit(session, actor="w")] == ["fact.status", "fact.status"]
    assert [e.action for e in registry.list_audit(session, object_type="model")] == ["model.add"]


def test_a_model_name_with_a_trailing_newline_is_refused(session: Session) -> None:
    # `re.match` with `$` accepted "alpha\n", a second model that lists as "alpha".
    with pytest.raises(InvalidInputError, match="model name"):
        add_model(session, "alpha\n")
