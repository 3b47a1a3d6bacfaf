"""What a version's solve preserves: the model's preservation corpus as transcripts (without the
ones that state an answer the version replaces) and its covariance at each edited layer."""

from __future__ import annotations

from sqlalchemy.orm import Session

from qfedit.config import Settings
from qfedit.covariance import CorpusText
from qfedit.edit import preservations_for
from qfedit.errors import PermanentError
from qfedit.evaluate import contains
from qfedit.facts import StaleAnswers
from qfedit.modeling import LoadedModel
from qfedit.pipeline import captures, corpora
from qfedit.pipeline.settings import ModelSettings
from qfedit.registry.facts import load_facts, to_record
from qfedit.solve import Preservation


def preservation_texts(
    loaded: LoadedModel, config: ModelSettings, settings: Settings, stale: StaleAnswers | None = None
) -> tuple[list[CorpusText], int]:
    """The model's preservation corpus (read inside the corpus roots) without the transcripts that
    state a stale answer, and how many those were."""
    corpus = config.corpus()
    if not corpus:
        raise PermanentError(
            "the preserving rule needs a preservation corpus or known facts in the model's settings"
        )
    setting = "preservation_corpus" if config.preservation_corpus else "known_facts"
    dropped = 0

    def leave_out(question: str, answer: str) -> bool:
        nonlocal dropped
        stated = stale is not None and stale(question, answer)
        dropped += stated
        return stated

    return corpora.read_texts(loaded, corpus, setting, settings, leave_out=leave_out), dropped


def build_preservations(
    loaded: LoadedModel,
    config: ModelSettings,
    settings: Settings,
    stale: StaleAnswers | None = None,
) -> dict[int, Preservation]:
    """The preservation covariance of the model's corpus at each edited layer (cached)."""
    texts, _ = preservation_texts(loaded, config, settings, stale)
    return preservations_for(loaded, config.edit, texts, settings.cache_dir)


def stale_answers(
    session: Session, replaced: dict[int, int], added: set[int], layer: int, fingerprint: str, abstention: str
) -> tuple[StaleAnswers, int]:
    """What the version's new facts replace: the facts they supersede, and what the base model
    answered to their questions where it knew something else (an update of its own knowledge).
    Transcripts and evaluation facts stating those answers are no longer to be kept."""
    old = [to_record(row) for row in load_facts(session, replaced)]
    known = captures.base_answers(session, added, layer, fingerprint)
    updates = 0
    for row in load_facts(session, known):
        said = known[row.id]
        if said.strip() and not contains(said, row.answer) and not contains(said, abstention):
            old.append(to_record(row).model_copy(update={"answer": said}))
            updates += 1
    return StaleAnswers.of(old), updates
