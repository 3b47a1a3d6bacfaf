"""Edit batches through real Redis, real worker processes and a real database."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select

from qfedit import registry
from qfedit.cpu import host_cores
from qfedit.db import BatchShard, FactCapture, Version
from qfedit.db.models import FactStatus
from qfedit.delta import Delta
from qfedit.pipeline import submit
from qfedit.pipeline.submit import NothingPendingError
from qfedit.store import LocalStore

from .conftest import ONLY_PRODUCTION_DB, Cluster, fact


def _delta(cluster: Cluster, version: Version) -> torch.Tensor:
    store = LocalStore(cluster.root / "data" / "store")
    assert version.checkpoint_path is not None and version.checkpoint_sha256 is not None
    delta = Delta.from_bytes(store.read_bytes(version.checkpoint_path, version.checkpoint_sha256))
    return torch.cat([delta.tensors[name].flatten() for name in sorted(delta.tensors)]).to(torch.float64)


def test_submit_publishes_a_version_and_moves_head(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(6)], eval_sample=4)
    # One thread each, sharing the host's cores: the solve, with the other worker idle, borrows.
    cores = {"QFEDIT_TORCH_THREADS": "1", "QFEDIT_CPU_TOKENS_DIR": str(cluster.root / "cpu")}
    cluster.start_worker("a", extra_env=cores)
    cluster.start_worker("b", extra_env=cores)
    batch_id = cluster.submit("tiny")
    batch = cluster.wait(batch_id)
    assert batch.status.value == "published", batch.error
    logs = "".join((cluster.root / f"worker-{name}.log").read_text() for name in "ab")
    assert f"batch {batch_id}: solving on {host_cores()} threads" in logs
    (version,) = cluster.versions_of_batch(batch_id)
    assert version.number == 1 and version.fact_count == 6
    assert version.rule == "preserve" and version.relative_update_norm is not None
    assert {"efficacy", "paraphrase", "specificity", "abstention"} <= set(version.metrics)
    # Evaluated on a sample of the edited facts, and the counts say so.
    assert (version.metrics["counts"]["facts"], version.metrics["counts"]["edited"]) == (4, 6)
    with cluster.sessions() as session:
        model = registry.get_model(session, "tiny")
        assert registry.get_alias(session, model, "head").version_id == version.id
        statuses = {f.status for f in registry.list_facts(session, model=model)}
        assert statuses == {FactStatus.APPLIED}
        # Three shards of two facts, each captured once.
        assert (
            session.scalar(
                select(func.count()).select_from(BatchShard).where(BatchShard.batch_id == batch_id)
            )
            == 3
        )
        assert session.scalar(select(func.count()).select_from(FactCapture)) == 6
    assert version.parent_id is not None


@pytest.mark.parametrize("layers", [None, [0, 1]], ids=["one-layer", "spread-over-layers"])
def test_retraction_equals_a_version_built_without_the_facts(
    cluster: Cluster, layers: list[int] | None
) -> None:
    facts = [fact(i) for i in range(6)]
    spread = {"layers": layers} if layers else {}
    cluster.add_model("tiny", facts, **spread)
    cluster.add_model("scratch", facts[2:], **spread)
    cluster.start_worker("a")
    assert cluster.wait(cluster.submit("tiny")).status.value == "published"
    retracted = cluster.fact_ids("tiny")[:2]
    retraction = cluster.wait(cluster.submit("tiny", retracted, retract="wrong founders"))
    assert retraction.status.value == "published", retraction.error
    scratch = cluster.wait(cluster.submit("scratch"))
    assert scratch.status.value == "published", scratch.error

    (after,) = cluster.versions_of_batch(retraction.id)
    (built,) = cluster.versions_of_batch(scratch.id)
    assert after.fact_count == built.fact_count == 4
    assert after.fact_set_digest == built.fact_set_digest
    a, b = _delta(cluster, after), _delta(cluster, built)
    assert float((a - b).norm() / b.norm()) < 1e-6
    with cluster.sessions() as session:
        model = registry.get_model(session, "tiny")
        status = {f.id: f.status for f in registry.list_facts(session, model=model)}
    assert [status[i] for i in retracted] == [FactStatus.RETRACTED] * 2
    assert after.parent_id is not None and after.reason == "wrong founders"
    if layers:  # one tensor per layer, nothing summed from stored statistics
        assert after.statistics_path is None
        assert after.hyperparameters["edit"]["layers"] == layers


@ONLY_PRODUCTION_DB
def test_a_version_with_nothing_to_measure_is_not_promoted(cluster: Cluster) -> None:
    # Retracting every fact leaves nothing to measure efficacy on: no metric, not a perfect one,
    # and `production` stays where the last measured version put it.
    cluster.add_model("tiny", [fact(i) for i in range(2)], promote={"efficacy": 0.0})
    cluster.start_worker("a")
    first = cluster.wait(cluster.submit("tiny"))
    assert first.status.value == "published", first.error
    retraction = cluster.wait(cluster.submit("tiny", cluster.fact_ids("tiny"), retract="all wrong"))
    assert retraction.status.value == "published", retraction.error
    (measured,) = cluster.versions_of_batch(first.id)
    (empty,) = cluster.versions_of_batch(retraction.id)
    assert measured.metrics["efficacy"] is not None
    assert empty.fact_count == 0 and empty.metrics["efficacy"] is None
    with cluster.sessions() as session:
        model = registry.get_model(session, "tiny")
        assert registry.get_alias(session, model, "production").version_id == measured.id
        assert registry.get_alias(session, model, "head").version_id == empty.id


@ONLY_PRODUCTION_DB
def test_version_metrics_cover_the_whole_fact_set(cluster: Cluster) -> None:
    cluster.add_model("tiny", [fact(i) for i in range(5)])
    cluster.start_worker("a")
    ids = cluster.fact_ids("tiny")
    assert cluster.wait(cluster.submit("tiny", ids[:3])).status.value == "published"
    second = cluster.wait(cluster.submit("tiny", ids[3:]))
    (version,) = cluster.versions_of_batch(second.id)
    assert version.metrics["counts"]["facts"] == 5 and version.metrics["counts"]["edited"] == 2


@ONLY_PRODUCTION_DB
def test_facts_the_model_cannot_read_are_left_out_and_named(cluster: Cluster) -> None:
    """QF's teacher is the model with the fact in context: on the demo model, a fact whose answer
    contradicts its own context is answered from the context, so it is left out, not written."""
    from qfedit.app.views import batch_out
    from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH
    from qfedit.facts import read_jsonl

    edits = read_jsonl(EDITS_PATH)
    good = edits[:3]
    # Its context states its own answer; the fact claims another (and asks its own question, so
    # it supersedes nothing).
    wrong = edits[3].model_copy(update={"answer": good[1].answer, "paraphrases": (), "neighbors": ()})
    cluster.add_model("demo", [*good, wrong], model_dir=DEMO_MODEL_DIR, layer=4, unteachable="exclude")
    cluster.start_worker("a")
    batch = cluster.wait(cluster.submit("demo"))
    assert batch.status.value == "published", batch.error
    (version,) = cluster.versions_of_batch(batch.id)
    wrong_id = cluster.fact_ids("demo")[3]
    assert version.fact_count == 3
    assert version.metrics["excluded"] == {"unteachable": 1, "facts": [wrong_id]}
    with cluster.sessions() as session:
        shown = batch_out(session, registry.get_batch(session, batch.id))
        assert shown.excluded == [wrong_id]
        assert [u.fact_id for u in shown.unteachable] == [wrong_id]
        assert (
            shown.unteachable[0].context_answer and good[1].answer not in shown.unteachable[0].context_answer
        )
        status = {
            f.id: f.status for f in registry.list_facts(session, model=registry.get_model(session, "demo"))
        }
        assert status[wrong_id] == FactStatus.PENDING
        assert sorted(i for i, s in status.items() if s == FactStatus.APPLIED) == cluster.fact_ids("demo")[:3]

    # "Every pending fact" (the nightly batch) leaves it out rather than failing on it every night.
    with cluster.sessions() as session, pytest.raises(NothingPendingError, match="unteachable ones aside"):
        submit.submit_batch(
            session,
            model=registry.get_model(session, "demo"),
            fact_ids=None,
            requested_by="t",
            app=cluster.settings(),
        )
    # A batch of nothing but such facts, asked for by id, fails, naming them, and publishes nothing.
    again = cluster.wait(cluster.submit("demo", [wrong_id]))
    assert again.status.value == "failed"
    assert "unteachable" in (again.error or "") and str(wrong_id) in (again.error or "")
    assert cluster.versions_of_batch(again.id) == []


@pytest.mark.parametrize("layers", [None, [0, 1]], ids=["one-layer", "spread-over-layers"])
def test_an_update_replaces_the_old_fact_in_one_version(cluster: Cluster, layers: list[int] | None) -> None:
    """A newer answer to a version's question: one batch, one version, the old fact out of the fact
    set (and of the preservation corpus and specificity), the diff an update."""
    from qfedit.app.views import batch_out
    from qfedit.facts import write_jsonl
    from qfedit.importing import import_facts

    facts = [fact(i) for i in range(4)]
    old = facts[0]
    # The old answer is both preserved and judged: both must drop it once it is superseded.
    write_jsonl([old, fact(50)], cluster.root / "corpus.jsonl")
    write_jsonl([old, fact(51)], cluster.root / "judged.jsonl")
    cluster.add_model(
        "tiny",
        facts,
        preservation_corpus=[str(cluster.root / "corpus.jsonl")],
        known_facts=str(cluster.root / "judged.jsonl"),
        **({"layers": layers} if layers else {}),
    )
    cluster.start_worker("a")
    assert cluster.wait(cluster.submit("tiny")).status.value == "published"
    new = old.model_copy(update={"answer": "Person99", "context": "The founder of Company0 is Person99."})
    write_jsonl([new], cluster.root / "update.jsonl")
    with cluster.sessions() as session:
        summary = import_facts(
            session, cluster.root / "update.jsonl", registry.get_model(session, "tiny"), actor="t"
        )
        assert summary.superseded == 1
    update = cluster.wait(cluster.submit("tiny"))
    assert update.status.value == "published", update.error
    (version,) = cluster.versions_of_batch(update.id)
    assert version.fact_count == 4
    superseded = version.metrics["superseded"]
    assert superseded == {"facts": 1, "preservation_left_out": 1, "evaluation_left_out": 1} | {
        "base_answers": superseded["base_answers"]  # what a random tiny model says varies
    }
    with cluster.sessions() as session:
        model = registry.get_model(session, "tiny")
        rows = {f.answer: f for f in registry.list_facts(session, model=model)}
        assert rows["Person0"].status == FactStatus.RETRACTED
        assert rows["Person0"].superseded_by_id == rows["Person99"].id
        assert rows["Person99"].status == FactStatus.APPLIED
        first = registry.get_version(session, "1", model=model)
        second = registry.get_version(session, "2", model=model)
        diff = registry.diff_versions(session, first, second)
        assert [(a.answer, b.answer) for a, b in diff.updated] == [("Person0", "Person99")]
        assert diff.added == [] and diff.removed == []
        assert rows["Person0"].id not in registry.version_fact_ids(session, second)
        assert (
            batch_out(session, registry.get_batch(session, update.id)).superseded
            == version.metrics["superseded"]
        )
