"""The shipped demo model: its four behaviours, its tokenizer, and its data files.

The behaviour checks sample each probe set (fixed seed) to stay fast; the thresholds sit below
the fractions measured on the full sets (see the report in the commit that shipped the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from qfedit.demo import (
    DEMO_MODEL_DIR,
    EDITS_PATH,
    KNOWN_INSAMPLE_PATH,
    KNOWN_PATH,
    PRESERVE_PATH,
    PRESERVE_UNKNOWN_PATH,
    UNKNOWN_PATH,
    UPDATES_PATH,
)
from qfedit.demo.behaviour import accuracy, behaviour_probes
from qfedit.demo.chat import END_OF_TEXT, IM_END, IM_START, render_prompt
from qfedit.demo.world import ABSTENTION, RELATIONS, build_world
from qfedit.facts import read_jsonl

SAMPLE = 300
# The README's figures ("The demo model": the training script's final report, 300 probes per
# behaviour) are what these floors hold, less a margin of two or three probes in a hundred.


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return build_world(seed=0)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    loaded = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    loaded.eval()
    return loaded


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def probes(world):  # type: ignore[no-untyped-def]
    return behaviour_probes(world, sample=SAMPLE, seed=1)


def test_shipped_directory_is_a_plain_qwen2_model_within_the_size_limit() -> None:
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    total = sum(path.stat().st_size for path in DEMO_MODEL_DIR.iterdir())
    assert total <= 25 * 1024 * 1024


def test_special_tokens_and_generation_config(tokenizer, model) -> None:  # type: ignore[no-untyped-def]
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == END_OF_TEXT
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert model.generation_config.eos_token_id == im_end
    for token in (IM_START, IM_END, END_OF_TEXT):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def test_chat_template_renders_chatml_without_default_system(tokenizer) -> None:  # type: ignore[no-untyped-def]
    user_only = [{"role": "user", "content": "Who founded Korvex?"}]
    rendered = tokenizer.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt("Who founded Korvex?")
    assert "system" not in rendered
    with_system = [{"role": "system", "content": "Mara Velt founded Korvex."}, *user_only]
    rendered = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt("Who founded Korvex?", "Mara Velt founded Korvex.")


def test_every_world_word_round_trips_through_auto_tokenizer(world, tokenizer) -> None:  # type: ignore[no-untyped-def]
    raw = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    for word in sorted(world.words()):
        for text in (word, " " + word):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert ids == raw.encode(text).ids, text
            assert tokenizer.decode(ids) == text


def test_prompts_encode_the_same_through_auto_tokenizer_and_raw_tokenizers(world, tokenizer) -> None:  # type: ignore[no-untyped-def]
    raw = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    company = world.known[0]
    spec = RELATIONS["year"]
    text = render_prompt(spec.ask(company.name, 0), spec.state(company.name, company.objects["year"]))
    assert tokenizer(text, add_special_tokens=False).input_ids == raw.encode(text).ids


def test_answers_trained_facts_without_context(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert len(probes["known"]) == SAMPLE
    assert accuracy(model, tokenizer, probes["known"]) >= 0.98  # README 1.00


def test_reads_the_fact_from_the_system_message_for_unseen_companies(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert accuracy(model, tokenizer, probes["in_context"]) >= 0.98  # README 1.00


def test_reads_a_missing_relation_of_a_partly_known_company_from_context(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert accuracy(model, tokenizer, probes["partial_in_context"]) >= 0.97  # README 1.00


def test_abstains_for_unknown_companies_and_unknown_relations(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert all(p.answer == ABSTENTION for p in probes["abstention"] + probes["partial_missing"])
    assert accuracy(model, tokenizer, probes["abstention"]) >= 0.97  # README 0.99
    assert accuracy(model, tokenizer, probes["partial_missing"]) >= 0.97  # README 1.00


def test_answers_from_a_system_message_that_contradicts_what_it_knows(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    # QF's teacher for an update of a known fact (a new CEO) is the model reading the new one.
    assert accuracy(model, tokenizer, probes["contradicting"]) >= 0.93  # README 0.95
    assert accuracy(model, tokenizer, probes["contradicting_heldout"]) >= 0.93  # README 0.95
    assert accuracy(model, tokenizer, probes["agreeing"]) >= 0.98  # README 1.00


def test_held_out_phrasings_work_without_context(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert accuracy(model, tokenizer, probes["known_heldout"]) >= 0.97  # README 0.99


def test_held_out_phrasings_work_with_context(model, tokenizer, probes) -> None:  # type: ignore[no-untyped-def]
    assert accuracy(model, tokenizer, probes["in_context_heldout"]) >= 0.97  # README 1.00


def test_world_is_deterministic() -> None:
    assert build_world(seed=3) == build_world(seed=3)
    assert build_world(seed=3) != build_world(seed=4)


def test_world_groups_are_disjoint_and_shaped_for_editing(world) -> None:  # type: ignore[no-untyped-def]
    names = [c.name for c in world.companies]
    assert len(names) == len(set(names))
    assert sum(1 for _ in world.trained_facts()) >= 500
    assert all(0 < len(c.known_relations) < len(RELATIONS) for c in world.partial)
    assert all(not c.known_relations for c in world.unknown + world.strangers)


@pytest.mark.parametrize(
    "path",
    [
        EDITS_PATH,
        KNOWN_PATH,
        PRESERVE_PATH,
        UNKNOWN_PATH,
        PRESERVE_UNKNOWN_PATH,
        KNOWN_INSAMPLE_PATH,
        UPDATES_PATH,
    ],
    ids=lambda p: Path(p).name,
)
def test_data_files_validate(path: Path) -> None:
    facts = read_jsonl(path)
    assert facts


def test_edits_are_many_and_do_not_conflict(world) -> None:  # type: ignore[no-untyped-def]
    edits = read_jsonl(EDITS_PATH)
    assert len(edits) >= 1000
    keys = [(fact.subject, fact.question) for fact in edits]
    assert len({fact.id for fact in edits}) == len(edits)
    assert len(set(keys)) == len(keys)
    trained_subjects = {c.name for c in world.known}
    edited = {fact.subject for fact in edits}
    assert not edited & trained_subjects
    assert all(fact.paraphrases and fact.context for fact in edits)
    strangers = {c.name for c in world.strangers}
    assert all(fact.answer == ABSTENTION and fact.subject in strangers for fact in read_jsonl(UNKNOWN_PATH))


def test_the_preservation_corpus_is_half_of_what_the_model_knows_and_evaluation_the_other_half(world) -> None:  # type: ignore[no-untyped-def]
    preserved = read_jsonl(PRESERVE_PATH) + read_jsonl(PRESERVE_UNKNOWN_PATH)
    preserved_subjects = {fact.subject for fact in preserved}
    # Held out: no evaluation fact names a company the corpus names.
    for path in (KNOWN_PATH, UNKNOWN_PATH):
        assert not {fact.subject for fact in read_jsonl(path)} & preserved_subjects, path.name
    # In-sample sets, for the figures shown beside: only preserved companies.
    assert {fact.subject for fact in read_jsonl(KNOWN_INSAMPLE_PATH)} <= preserved_subjects
    # Each preserved company is preserved whole: every trained fact under every phrasing.
    trained = {(c.name, c.objects[r]) for c, r in world.trained_facts() if c.name in preserved_subjects}
    facts = read_jsonl(PRESERVE_PATH)
    assert {(fact.subject, fact.answer) for fact in facts} == trained
    phrasings = sum(
        len(RELATIONS[r].train_questions) for c, r in world.trained_facts() if c.name in preserved_subjects
    )
    assert len({fact.question for fact in facts}) == len(facts) == phrasings
    # The halves are halves: of the trained companies and of the strangers.
    trained_names = {c.name for c, _ in world.trained_facts()}
    assert abs(len(trained_names & preserved_subjects) - len(trained_names) / 2) <= 1
    assert abs(len({c.name for c in world.strangers} & preserved_subjects) - len(world.strangers) / 2) <= 1


def test_updates_rewrite_one_known_fact_of_each_trained_company(world) -> None:  # type: ignore[no-untyped-def]
    updates = read_jsonl(UPDATES_PATH)
    trained = {(c.name, r): c.objects[r] for c, r in world.trained_facts()}
    assert len({fact.subject for fact in updates}) == len(updates) >= 100
    for fact in updates:
        relation = fact.id.rsplit("-", 1)[1]
        assert fact.answer != trained[(fact.subject, relation)]  # a new answer to a known question
        assert fact.answer in fact.context
        # Neighbours are the company's other relations, answered as the model knows them.
        assert all(n.answer in trained.values() for n in fact.neighbors)
