"""The state commands end to end, through the `qfedit` app, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli import get_app
from qfedit import registry
from qfedit.db import make_engine, session_factory
from qfedit.delta import Delta
from qfedit.store import LocalStore

SAMPLES = Path(registry.__file__).parent.parent / "data" / "samples"


@pytest.fixture
def cli(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("QFEDIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QFEDIT_DATABASE_URL", database_url)
    monkeypatch.setenv("QFEDIT_ACTOR", "tester")
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(get_app(), list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result

    return run


def _json(result: Any) -> Any:
    return json.loads(result.stdout)


def test_history_commands(
    cli: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layers.1.down_proj.weight": torch.ones(2, 2)}, str(model_dir / "model.safetensors"))

    cli("db", "upgrade")
    added = _json(cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--rule", "seed", "--json"))
    assert added["default_layer"] == 1 and len(added["fingerprint"]) == 64
    assert (
        "registered: tiny" in cli("import", str(SAMPLES / "facts.jsonl"), "--model", "nope", ok=False).output
    )
    summary = _json(cli("import", str(SAMPLES / "facts.jsonl"), "--model", "tiny", "--json"))
    assert (summary["read"], summary["imported"], summary["rejected"]) == (4, 4, 0)
    facts = _json(cli("facts", "--model", "tiny", "--status", "pending", "--json"))
    assert [f["source_line"] for f in facts] == [1, 2, 3, 4]

    # A worker would do this: store the delta, then record the version.
    store = LocalStore(tmp_path / "data" / "store")
    engine = make_engine(database_url)
    with session_factory(engine)() as session:
        _record(session, store, [f["id"] for f in facts[:2]], 1.0, "two facts")
        _record(session, store, [f["id"] for f in facts[1:]], 3.0, "swap one")
    engine.dispose()
    orphan = store.put_bytes(b"crashed before recording")
    os.utime(tmp_path / "data" / "store" / orphan.path, (time.time() - 7200,) * 2)

    cli("alias", "set", "production", "tiny@2", "--reason", "ship")
    cli("alias", "set", "production", "tiny@1", "--reason", "rollback")
    cli("alias", "set", "production", "tiny@2", "--reason", "stale", "--expect-revision", "1", ok=False)
    versions = _json(cli("versions", "--json"))
    assert [(v["number"], v["facts_added"], v["facts_removed"], v["aliases"]) for v in versions] == [
        (0, 0, 0, []),
        (1, 2, 0, ["production"]),
        (2, 2, 1, []),
    ]
    shown = _json(cli("show", "tiny@production", "--json"))
    assert shown["number"] == 1 and len(shown["facts"]) == 2
    diff = _json(cli("diff", "tiny@1", "tiny@2", "--json"))
    assert len(diff["facts_added"]) == 2 and len(diff["facts_removed"]) == 1
    assert diff["weight_difference_norm"] == pytest.approx(4.0)  # |(3 - 1) * ones(2, 2)|
    assert diff["metric_changes"] == {"acc": {"old": 1.0, "new": 3.0}}
    history = _json(cli("alias", "history", "production", "--json"))
    assert [(h["from"], h["to"], h["reason"]) for h in history] == [(None, 2, "ship"), (2, 1, "rollback")]
    # With a second model, the alias still names its model: only tiny has `production`.
    cli("model", "add", "other", str(model_dir), "--layer", "1", "--rule", "seed")
    assert _json(cli("alias", "history", "production", "--json")) == history
    assert _json(cli("alias", "history", "tiny@production", "--json")) == history
    assert "no alias 'production'" in cli("alias", "history", "other@production", ok=False).output
    # The audit log names objects as everything else does.
    logged = cli("log").output
    assert "tiny@production" in logged and "alias 1" not in logged
    # `versions` fits an 80-column terminal, metrics as short columns.
    monkeypatch.setenv("COLUMNS", "80")
    table = cli("versions").output.splitlines()
    assert max(len(line) for line in table) <= 80, table
    assert any(line.split()[:1] == ["tiny@1"] and "production" in line for line in table), table
    log = _json(cli("log", "--action", "alias", "--json"))
    assert [e["details"]["reason"] for e in log] == ["rollback", "ship"]
    assert all(e["actor"] == "tester" for e in log)

    assert _json(cli("gc", "--dry-run", "--json"))["files"] == [orphan.path]
    assert (tmp_path / "data" / "store" / orphan.path).exists()
    cli("gc")
    assert not (tmp_path / "data" / "store" / orphan.path).exists()

    # Descriptions, tags and archiving, as MLflow's registry has them: edited, audited, deleting nothing.
    shown = _json(cli("describe", "tiny", "--description", "support bot", "--tag", "team=support", "--json"))
    assert shown == {"description": "support bot", "tags": {"team": "support"}}
    tagged = _json(cli("describe", "tiny@2", "--tag", "ticket=QF-1", "--json"))
    assert tagged["tags"] == {"ticket": "QF-1"} and tagged["archived"] is False
    assert "alias production" in cli("archive", "tiny@1", "--reason", "old", ok=False).output
    cli("archive", "tiny@2", "--reason", "replaced")
    assert [v["number"] for v in _json(cli("versions", "--model", "tiny", "--json"))] == [0, 1]
    assert [v["archived"] for v in _json(cli("versions", "--model", "tiny", "--all", "--json"))] == [
        False,
        False,
        True,
    ]
    assert _json(cli("gc", "--dry-run", "--json"))["files"] == []  # its checkpoint is kept
    cli("archive", "tiny@2", "--reason", "needed", "--restore")
    actions = {e["action"] for e in _json(cli("log", "--json"))}
    assert {"model.described", "version.described", "version.archived", "version.restored"} <= actions
    assert _json(cli("gc", "--dry-run", "--json"))["files"] == []
    # Everything a version references survived, verified by hash.
    cli("diff", "tiny@0", "tiny@2")
    # Human-readable tables render too.
    for args in (["versions"], ["show", "tiny@2"], ["log"], ["facts"], ["alias", "list"], ["model", "list"]):
        assert cli(*args).stdout.strip()


def _record(session: Session, store: LocalStore, fact_ids: list[int], scale: float, reason: str) -> None:
    model = registry.get_model(session, "tiny")
    delta = Delta({"layers.1.down_proj.weight": torch.ones(2, 2) * scale}, base_fingerprint=model.fingerprint)
    checkpoint = store.put_bytes(delta.to_bytes())
    registry.record_version(
        session,
        model=model,
        fact_ids=fact_ids,
        created_by="worker",
        reason=reason,
        checkpoint=checkpoint,
        layer=1,
        rule="preserving",
        relative_update_norm=0.01 * scale,
        metrics={"acc": scale},
    )
    session.commit()


def test_commands_on_an_unmigrated_database_say_how_to_fix_it(cli: Any, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        # The embedded default creates itself on first use.
        assert _json(cli("versions", "--json")) == []
    else:
        assert "qfedit db upgrade" in cli("versions", ok=False).output


def test_model_list_shows_the_layer_its_batches_edit(cli: Any, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layers.1.down_proj.weight": torch.ones(2, 2)}, str(model_dir / "model.safetensors"))
    cli("db", "upgrade")
    cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--rule", "seed")
    cli("model", "configure", "tiny", "--set", "edit.layer=3")  # what the demo's settings do
    row = next(line for line in cli("model", "list").output.splitlines() if "tiny" in line)
    assert [cell.strip() for cell in row.split("│")][3] == "3", row


def test_fact_shows_its_supersession_history(cli: Any, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layers.1.down_proj.weight": torch.ones(2, 2)}, str(model_dir / "model.safetensors"))
    cli("db", "upgrade")
    cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--rule", "seed")
    for name, person in (("old.jsonl", "Ann"), ("new.jsonl", "Bob")):
        record = {
            "question": "Who is the CEO of Acme?",
            "answer": person,
            "context": f"The CEO of Acme is {person}.",
        }
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        cli("import", str(tmp_path / name), "--model", "tiny")
    facts = {f["answer"]: f for f in _json(cli("facts", "--json"))}
    old, new = facts["Ann"], facts["Bob"]
    assert (old["status"], old["superseded_by"]) == ("retracted", new["id"])
    shown = _json(cli("fact", str(new["id"]), "--json"))
    assert shown["supersedes"] == [old["id"]] and shown["superseded_by"] is None
    text = cli("fact", str(old["id"])).output
    assert f"superseded by fact {new['id']} (Bob, pending)" in text
    assert "(superseded by" in cli("facts").output


def test_retract_finds_the_model_from_the_fact_ids(session: Session) -> None:
    from cli.common import model_of_facts
    from qfedit.errors import InvalidInputError

    from .helpers import add_facts, add_model

    tiny, other = add_model(session, "tiny"), add_model(session, "other")
    (mine,), (theirs,) = add_facts(session, tiny, 1), add_facts(session, other, 1, start=5)
    session.commit()
    assert model_of_facts(session, None, [theirs]).name == "other"  # no --model needed
    assert model_of_facts(session, "tiny", [mine]).name == "tiny"
    with pytest.raises(InvalidInputError, match=r"several models \(other, tiny\)"):
        model_of_facts(session, None, [mine, theirs])
    with pytest.raises(registry.NotFoundError, match="no fact 999999"):
        model_of_facts(session, None, [999999])


def _model_dir(tmp_path: Path, layers: int = 2) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layers.1.down_proj.weight": torch.ones(2, 2)}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return model_dir


def test_model_add_refuses_settings_an_edit_cannot_run_with(cli: Any, tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    cli("db", "upgrade")
    # The preserving rule (the default) without a corpus: refused at registration, not after a capture.
    refused = cli("model", "add", "tiny", str(model_dir), "--layer", "1", ok=False)
    assert refused.exit_code == 2 and "settings.preservation_corpus" in refused.output
    refused = cli("model", "add", "tiny", str(model_dir), "--layer", "2", "--rule", "seed", ok=False)
    assert "settings.edit.layer': layer 2 is out of range; the model has 2 layers" in refused.output
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "broken.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{"question": \n')
    refused = cli(
        "model",
        "add",
        "tiny",
        str(model_dir),
        "--layer",
        "1",
        "--preserve",
        str(data / "broken.jsonl"),
        ok=False,
    )
    assert "broken.jsonl line 2 is not valid JSON" in refused.output
    assert _json(cli("model", "list", "--json")) == []  # nothing registered by a refusal


def test_model_add_takes_the_settings_a_user_needs(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _model_dir(tmp_path)
    cli("db", "upgrade")
    data = tmp_path / "data"
    (data / "corpora").mkdir(parents=True)
    record = json.dumps({"question": "Who runs Acme?", "answer": "Ann"}) + "\n"
    for name in ("a.jsonl", "b.jsonl"):
        (data / "corpora" / name).write_text(record)
    # Paths typed relative to the working directory are stored resolved.
    monkeypatch.chdir(data)
    cli(
        "model",
        "add",
        "tiny",
        str(model_dir),
        "--layers",
        "0-1",
        "--preserve",
        "corpora/a.jsonl",
        "--preserve",
        "corpora/b.jsonl",
        "--lam",
        "7",
    )
    shown = _json(cli("model", "configure", "tiny", "--json"))
    assert shown["preservation_corpus"] == [str(data / "corpora" / n) for n in ("a.jsonl", "b.jsonl")]
    assert (shown["edit"]["layer"], shown["edit"]["layers"], shown["edit"]["solve"]["lam"]) == (
        1,
        [0, 1],
        7.0,
    )
    # --set takes lists with commas.
    monkeypatch.chdir(data / "corpora")
    shown = _json(
        cli(
            "model",
            "configure",
            "tiny",
            "--set",
            "preservation_corpus=b.jsonl,a.jsonl",
            "--set",
            "layers=1",
            "--json",
        )
    )
    assert shown["preservation_corpus"] == [str(data / "corpora" / n) for n in ("b.jsonl", "a.jsonl")]
    assert shown["edit"]["layers"] == [1]
    # A configuration that could not edit is refused and changes nothing.
    refused = cli("model", "configure", "tiny", "--set", "preservation_corpus=[]", ok=False)
    assert "settings.preservation_corpus" in refused.output
    assert _json(cli("model", "configure", "tiny", "--json"))["preservation_corpus"][0].endswith("b.jsonl")
    # A settings file (TOML), its file names taken from its own folder; options override it.
    (data / "corpora" / "tiny.toml").write_text(
        'preservation_corpus = ["a.jsonl"]\n[edit]\nlayer = 1\n[edit.solve]\nlam = 3.0\n'
    )
    monkeypatch.chdir(tmp_path)
    cli(
        "model",
        "add",
        "other",
        str(model_dir),
        "--settings",
        str(data / "corpora" / "tiny.toml"),
        "--ridge",
        "0.5",
    )
    shown = _json(cli("model", "configure", "other", "--json"))
    assert shown["preservation_corpus"] == [str(data / "corpora" / "a.jsonl")]
    assert (shown["edit"]["solve"]["lam"], shown["edit"]["solve"]["ridge"]) == (3.0, 0.5)


def test_model_add_preset_demo_registers_the_demo_settings(cli: Any) -> None:
    from qfedit.demo.settings import DEMO_LAYERS, DEMO_SOLVE

    cli("db", "upgrade")
    cli("model", "add", "demo", "--preset", "demo")
    shown = _json(cli("model", "configure", "demo", "--json"))
    assert shown["edit"]["layers"] == DEMO_LAYERS and shown["edit"]["solve"]["lam"] == DEMO_SOLVE["lam"]
    assert all(Path(name).is_absolute() and Path(name).is_file() for name in shown["preservation_corpus"])


def test_batch_submit_refuses_before_capture_what_cannot_edit(cli: Any, tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    cli("db", "upgrade")
    corpus = tmp_path / "data" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(json.dumps({"question": "Who runs Acme?", "answer": "Ann"}) + "\n")
    cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--preserve", str(corpus))
    cli("import", str(SAMPLES / "facts.jsonl"), "--model", "tiny")
    corpus.unlink()  # gone since registration
    refused = cli("batch", "submit", "--model", "tiny", ok=False)
    assert "setting 'preservation_corpus'" in refused.output and "does not exist" in refused.output
    assert _json(cli("batch", "list", "--json")) == []  # no batch, nothing queued or captured


def test_doctor_checks_what_batches_need(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _model_dir(tmp_path)
    cli("db", "upgrade")
    cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--rule", "seed")
    checks = {c["name"]: c for c in _json(cli("doctor", "--json"))}
    assert {name: c["status"] for name, c in checks.items()} == {
        "database": "ok",
        "broker": "ok",
        "store": "ok",
        "cores": "ok",
        "workers": "ok",
        "model tiny": "ok",
    }
    # A model directory gone and a broker nobody answers at: each named, and the exit status says so.
    (model_dir / "config.json").unlink()
    monkeypatch.setenv("QFEDIT_BROKER_URL", "redis://127.0.0.1:1/0")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("QFEDIT_CPU_TOKENS_DIR", str(tmp_path / "not-a-folder"))
    failed = cli("doctor", "--json", ok=False)
    checks = {c["name"]: c for c in _json(failed)}
    assert checks["broker"]["status"] == "fail" and "unreachable" in checks["broker"]["detail"]
    assert checks["model tiny"]["status"] == "fail" and "no model directory" in checks["model tiny"]["detail"]
    assert checks["workers"]["status"] == "fail" and "qfedit worker" in checks["workers"]["detail"]
    assert checks["cores"]["status"] == "fail" and "not-a-folder" in checks["cores"]["detail"]


def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {
        **os.environ,
        "QFEDIT_DATA_DIR": str(tmp_path),
        "QFEDIT_API_TOKENS": '{"ci": {"token": "short", "scope": "write"}}',
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli", "versions"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith(
        "error: setting QFEDIT_API_TOKENS (ci.token): a token needs at least 32 characters"
    )
    assert "short" not in done.stderr  # the value (a secret, when it is right) is not echoed
    debug = subprocess.run(
        [sys.executable, "-m", "cli", "--debug", "versions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" in debug.stderr


def test_help_shows_flags_as_flags(cli: Any) -> None:
    text = cli("batch", "submit", "--help").output
    assert "--wait / --no-wait" in text and "<bool>" not in text
    assert "<bool>" not in cli("--help").output


def test_the_import_table_counts_the_older_answers_it_supersedes(cli: Any, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layers.1.down_proj.weight": torch.ones(2, 2)}, str(model_dir / "model.safetensors"))
    cli("db", "upgrade")
    cli("model", "add", "tiny", str(model_dir), "--layer", "1", "--rule", "seed")
    cli("import", str(SAMPLES / "facts.jsonl"), "--model", "tiny")
    first = json.loads((SAMPLES / "facts.jsonl").read_text().splitlines()[0])
    update = tmp_path / "update.jsonl"
    update.write_text(
        json.dumps({**first, "answer": "Somebody Else", "context": "Somebody Else did."}) + "\n"
    )
    shown = cli("import", str(update), "--model", "tiny").output
    header, values = (line for line in shown.splitlines() if "superseded" in line or "│" in line)
    assert "superseded" in header
    assert [cell.strip() for cell in values.split("│") if cell.strip()] == ["1", "1", "0", "1", "0"]
