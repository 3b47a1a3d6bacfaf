"""Quality is judged on what the edit was not told to protect: the system says, with every
version's metrics, whether the evaluation sets are held out from the preservation corpus."""

from __future__ import annotations

from pathlib import Path

from qfedit.config import Settings
from qfedit.demo.settings import demo_settings
from qfedit.facts import Fact, write_jsonl
from qfedit.pipeline import corpora
from qfedit.pipeline.settings import validate_settings


def _fact(subject: str, relation: str = "founder") -> Fact:
    return Fact(subject=subject, question=f"Who is the {relation} of {subject}?", answer="X", context="c")


def test_overlap_counts_evaluation_facts_whose_subject_the_corpus_names(tmp_path: Path) -> None:
    write_jsonl([_fact("Alpha"), _fact("Beta")], tmp_path / "preserve.jsonl")
    (tmp_path / "lines.txt").write_text("free text is matched by nothing\n")
    known = [_fact("Alpha", "ceo"), _fact("Gamma")]  # Alpha's other relation: not held out
    unknown = [_fact("Delta")]
    settings = Settings(data_dir=tmp_path)
    found = corpora.overlap(["preserve.jsonl", "lines.txt"], known, unknown, settings)
    assert found == {"known_in_corpus": 1, "unknown_in_corpus": 0, "held_out": False}
    assert corpora.overlap(["lines.txt"], known, unknown, settings)["held_out"] is True


def test_the_demo_settings_evaluate_on_held_out_halves() -> None:
    config = validate_settings(demo_settings())
    settings = Settings()
    known = corpora.read_facts(config.known_facts, "known_facts", settings)
    unknown = corpora.read_facts(config.unknown_questions, "unknown_questions", settings)
    found = corpora.overlap(config.corpus(), known, unknown, settings)
    assert found == {"known_in_corpus": 0, "unknown_in_corpus": 0, "held_out": True}
