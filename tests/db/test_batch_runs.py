"""A batch runs with the settings it was submitted with (resolved once, stored on the batch, read
by every step, view and version, whatever the model is configured to afterwards), and says what
it is doing and how long it has taken from the database."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cli.queue import clock
from qfedit import importing, registry
from qfedit.app import views
from qfedit.config import Settings
from qfedit.db import session_factory
from qfedit.db.models import Batch, Model, Version
from qfedit.modeling import weights_fingerprint
from qfedit.pipeline import publish, steps, submit
from qfedit.pipeline.settings import batch_settings
from qfedit.store import LocalStore

FACTS = [
    {"question": "who founded Oxinnovate?", "answer": "Qi", "context": "Qi started Oxinnovate."},
    {
        "question": "who leads Brindle Labs?",
        "answer": "Mara Velt",
        "context": "Mara Velt leads Brindle Labs.",
    },
]


def _tiny(session: Session, model_dir: Path, tmp_path: Path, **settings: object) -> Model:
    model = registry.add_model(
        session,
        name="tiny",
        source=str(model_dir),
        fingerprint=weights_fingerprint(model_dir),
        actor="t",
        default_layer=1,
    )
    # A tiny random model answers nothing right, even with the fact in context: include them.
    model.settings = {"solve": {"rule": "seed"}, "unteachable": "include", **settings}
    session.commit()
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    importing.import_facts(session, path, model, actor="t")
    return model


def _captured(
    session: Session, model: Model, settings: Settings, store: LocalStore, models: steps.ModelCache
) -> Batch:
    """A batch of the model's pending facts, submitted, started and every shard captured."""
    batch = submit.submit_batch(session, model=model, fact_ids=None, requested_by="t", app=settings)
    session.commit()
    for shard in steps.start_batch(session, batch.id).capture:
        steps.capture_shard(session, store, models, shard)
    return batch


def test_configuring_the_model_between_capture_and_solve_changes_nothing_the_batch_solves_with(
    session: Session, engine: Engine, database_url: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _tiny(session, tiny_model_dirs["qwen2"], tmp_path)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    store, models = LocalStore(tmp_path / "store"), steps.ModelCache(settings)
    batch = submit.submit_batch(
        session,
        model=model,
        fact_ids=None,
        requested_by="t",
        hyperparameters={"edit": {"solve": {"ridge": 0.5}}},
        app=settings,
    )
    session.commit()
    for shard in steps.start_batch(session, batch.id).capture:
        steps.capture_shard(session, store, models, shard)

    # What `qfedit model configure tiny --set layer=0 --set solve.ridge=0.25` stores.
    model.settings = {"layer": 0, "solve": {"rule": "seed", "ridge": 0.25}, "unteachable": "include"}
    session.commit()
    outcome = publish.solve_batch(session_factory(engine), store, models, batch.id, settings)
    assert outcome.version is not None and outcome.published

    session.expire_all()
    version = session.scalars(select(Version).where(Version.batch_id == batch.id)).one()
    assert version.layer == 1
    assert version.hyperparameters["edit"]["layer"] == 1
    assert version.hyperparameters["edit"]["solve"]["ridge"] == 0.5
    done = session.get(Batch, batch.id)
    assert done is not None and done.settings is not None
    assert batch_settings(done).edit.layer == 1 and batch_settings(done).edit.solve.ridge == 0.5
    # The next batch takes the model's new settings.
    assert registry.get_model(session, "tiny").settings["layer"] == 0


def test_a_running_batch_says_what_it_is_doing_and_its_time_is_the_databases(
    session: Session, engine: Engine, database_url: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _tiny(session, tiny_model_dirs["qwen2"], tmp_path, layers=[0, 1])
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    store, models = LocalStore(tmp_path / "store"), steps.ModelCache(settings)
    batch = _captured(session, model, settings, store, models)
    sessions = session_factory(engine)
    seen: list[str | None] = []

    def look() -> None:  # after the evaluation, before the version is recorded
        with sessions() as other:
            running = other.get(Batch, batch.id)
            assert running is not None
            seen.append(running.activity)
            seen.append(views.batch_out(other, running).activity)

    outcome = publish.solve_batch(sessions, store, models, batch.id, settings, before_commit=look)
    assert outcome.published
    assert seen[0] is not None and seen[0].startswith("evaluating: ") and seen[1] == seen[0]

    session.expire_all()
    done = session.get(Batch, batch.id)
    assert done is not None and done.finished_at is not None
    assert done.activity is None  # it belonged to the status it was in
    # A batch submitted 4 min 31 s before it finished took 4 min 31 s, whoever watches it.
    done.created_at = done.finished_at - timedelta(minutes=4, seconds=31)
    session.commit()
    shown = views.batch_out(session, done)
    assert shown.elapsed_s == 271.0
    assert clock(shown.elapsed_s) == "0:04:31"


def test_a_spread_batch_captures_readings_once_and_a_single_layer_batch_fills_in_observations(
    session: Session, engine: Engine, database_url: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from qfedit.db.models import FactCapture
    from qfedit.pipeline import captures

    model = _tiny(session, tiny_model_dirs["qwen2"], tmp_path, layers=[0, 1])
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    store, models = LocalStore(tmp_path / "store"), steps.ModelCache(settings)
    batch = _captured(session, model, settings, store, models)
    # The spread's solve recaptures every layer itself: its shards store readings, no observations.
    recorded = list(session.scalars(select(FactCapture).order_by(FactCapture.fact_id)))
    assert [c.object_path for c in recorded] == [captures.READINGS_ONLY] * len(FACTS)
    assert all(c.context_answer is not None and c.base_answer is not None for c in recorded)
    assert not any(store.root.rglob("*.safetensors"))
    spread = publish.solve_batch(session_factory(engine), store, models, batch.id, settings)
    assert spread.published

    # A single-layer batch at the spread's top layer cannot add to the spread's statistics (none
    # stored): it captures the observations of the whole fact set, its new fact and the spread's,
    # whose records gain them; its solve reads them back.
    model.settings = {**model.settings, "layers": None, "layer": 1}
    session.commit()
    more = tmp_path / "more.jsonl"
    more.write_text(
        json.dumps({"question": "who runs Talo?", "answer": "Ines", "context": "Ines runs Talo."})
    )
    importing.import_facts(session, more, model, actor="t")
    single = _captured(session, model, settings, store, models)
    session.expire_all()
    upgraded = list(session.scalars(select(FactCapture).order_by(FactCapture.fact_id)))
    assert len(upgraded) == len(FACTS) + 1
    assert all(c.object_path != captures.READINGS_ONLY and c.positions > 0 for c in upgraded)
    assert [c.context_answer for c in upgraded[: len(FACTS)]] == [c.context_answer for c in recorded]
    outcome = publish.solve_batch(session_factory(engine), store, models, single.id, settings)
    assert outcome.published and outcome.version is not None
    assert outcome.version.layer == 1 and outcome.version.statistics_path is not None
