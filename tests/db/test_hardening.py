"""What a write token can reach: a batch overrides only its edit settings, never policy or files;
files named by model settings are opened only inside the corpus roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from qfedit import registry
from qfedit.config import Settings
from qfedit.errors import InvalidInputError
from qfedit.pipeline import corpora, submit
from qfedit.pipeline.settings import ModelSettings, batch_settings, model_settings

from .helpers import add_facts, add_model

POLICY_AND_FILES = {
    "promote": {"efficacy": 0.0},
    "known_facts": "/etc/passwd",
    "unknown_questions": "/etc/hostname",
    "preservation_corpus": ["/etc/hostname"],
    "shard_size": 1,
    "eval_sample": 1,
}


@pytest.mark.parametrize("key", sorted(POLICY_AND_FILES))
def test_a_batch_cannot_override_policy_or_files(session: Session, key: str) -> None:
    model = add_model(session)
    model.settings = {**(model.settings or {}), "promote": {"efficacy": 0.99}}
    ids = add_facts(session, model, 2)
    with pytest.raises(InvalidInputError, match=f"{key} is a model setting") as refused:
        submit.submit_batch(
            session,
            model=model,
            fact_ids=ids,
            requested_by="writer",
            hyperparameters={key: POLICY_AND_FILES[key]},
        )
    assert refused.value.field == f"hyperparameters.{key}"
    # Edit settings, flat or nested, are a batch's to choose.
    batch = submit.submit_batch(
        session, model=model, fact_ids=ids, requested_by="writer", hyperparameters={"solve": {"lam": 3}}
    )
    assert batch_settings(batch).edit.solve.lam == 3 and batch_settings(batch).promote == {"efficacy": 0.99}


@pytest.mark.parametrize(
    ("setting", "value"), [("shard_size", 10_001), ("capture_batch_size", 1025), ("known_sample", 10**7)]
)
def test_worker_sizes_have_upper_bounds(setting: str, value: int) -> None:
    with pytest.raises(ValueError, match=setting):
        ModelSettings.model_validate({"edit": {"layer": 1}, setting: value})


@pytest.mark.parametrize("promote", [{}, {"efficacy": float("nan")}, {"efficacy": float("inf")}])
def test_an_empty_or_non_finite_promotion_threshold_is_refused(promote: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="threshold"):
        ModelSettings.model_validate({"edit": {"layer": 1}, "promote": promote})


VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["/etc/passwd", "../../etc/passwd", "/dev/zero", "known.jsonl", "~/x"]),
    st.lists(st.sampled_from(["/etc/hostname", "corpus.jsonl", "../x"]), max_size=3),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.dictionaries(
        st.sampled_from(["efficacy", "lam", "rule", "layer"]), st.floats(allow_nan=True), max_size=2
    ),
)
KEYS = st.sampled_from(
    [
        *sorted(ModelSettings.model_fields),
        "layer",
        "solve",
        "include_eos",
        "covariance_samples",
        "preserve_positions",
        "lambda",
        "Known_facts",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overrides=st.dictionaries(KEYS, VALUES, max_size=4)
    | st.fixed_dictionaries({"edit": st.dictionaries(KEYS, VALUES, max_size=3)})
)
def test_no_override_a_write_token_sends_changes_a_file_setting(
    session: Session, overrides: dict[str, object]
) -> None:
    model = session.info.get("hardening-model")
    if model is None:
        model = add_model(session)
        # Files that exist, inside the shipped corpus root: a submission runs up to its overrides.
        shipped = Path(registry.__file__).parent.parent / "data" / "demo"
        model.settings = {
            "known_facts": str(shipped / "known.jsonl"),
            "preservation_corpus": [str(shipped / "preserve.jsonl")],
        }
        session.info["hardening-model"] = model
        session.info["hardening-ids"] = add_facts(session, model, 1)
    before = model_settings(model)
    try:
        batch = submit.submit_batch(
            session,
            model=model,
            fact_ids=session.info["hardening-ids"],
            requested_by="writer",
            hyperparameters=overrides,
        )
    except (InvalidInputError, ValueError):
        return
    after = batch_settings(batch)
    files = ("known_facts", "unknown_questions", "preservation_corpus", "promote")
    assert {f: getattr(after, f) for f in files} == {f: getattr(before, f) for f in files}


def test_model_settings_open_files_only_inside_the_corpus_roots(tmp_path: Path) -> None:
    root = tmp_path / "corpora"
    root.mkdir()
    (root / "known.jsonl").write_text("{}\n")
    (tmp_path / "outside.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "outside.jsonl", root / "link.jsonl")
    os.mkfifo(root / "fifo.jsonl")
    config = Settings(data_dir=tmp_path / "data", corpus_root=root)
    roots = corpora.corpus_roots(config)
    assert corpora.resolve("known.jsonl", "known_facts", roots) == (root / "known.jsonl").resolve()
    refusals = {
        str(tmp_path / "outside.jsonl"): "outside the corpus roots",
        "../outside.jsonl": "outside the corpus roots",
        "link.jsonl": "outside the corpus roots",  # a symlink is followed, then judged
        "/etc/passwd": "outside the corpus roots",
        "fifo.jsonl": "not a regular file",
        "missing.jsonl": "does not exist",
    }
    for name, reason in refusals.items():
        with pytest.raises(InvalidInputError, match=reason) as refused:
            corpora.resolve(name, "known_facts", roots)
        assert refused.value.field == "known_facts"


@settings(max_examples=200, deadline=None)
@given(
    name=st.lists(st.sampled_from([*"./abc~-_", "..", "/etc", "/tmp", "/passwd"]), max_size=12).map("".join)
)
def test_whatever_a_name_says_a_resolved_path_is_inside_a_root(name: str) -> None:
    root = Path("/tmp/qfedit-hardening-root").resolve()
    root.mkdir(exist_ok=True)
    (root / "a").write_text("x")
    roots = [root, corpora.corpus_roots(Settings())[1]]
    try:
        path = corpora.resolve(name, "setting", roots)
    except InvalidInputError:
        return
    assert any(path.is_relative_to(r) for r in roots) and path.is_file()


def test_the_embedded_database_is_created_private_under_a_permissive_umask(tmp_path: Path) -> None:
    # The attack: under the usual umask 022 the embedded database (every fact, the audit log) was
    # created 0644, readable by every local user.
    import stat

    from sqlalchemy import text

    from qfedit.db import make_engine

    database = tmp_path / "data" / "qfedit.db"
    previous = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{database}")
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
            files = sorted(database.parent.iterdir())
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        engine.dispose()
    finally:
        os.umask(previous)
    assert "qfedit.db-wal" in modes  # WAL: its side files take the database's mode
    assert modes == dict.fromkeys(modes, 0o600), modes
