"""The files a model's settings name (preservation corpus, known facts, unknown questions), opened
only inside the corpus roots.

Settings are typed by people; the worker that reads them runs with the service's rights. So a
name is resolved (symlinks included) and must land on a regular file under one of the roots: the
configured corpus root (`QFEDIT_CORPUS_ROOT`, by default the data folder) or the data shipped with
qfedit. A refusal, and any error while reading, names the setting and the file, never its content.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qfedit.config import Settings
from qfedit.errors import InvalidInputError, PermanentError
from qfedit.facts import Fact, FactError, read_jsonl

if TYPE_CHECKING:  # the engine's torch side: read commands import this module, never torch
    from qfedit.covariance import CorpusText
    from qfedit.modeling import LoadedModel

_SHIPPED = Path(__file__).resolve().parent.parent / "data"


def corpus_roots(settings: Settings) -> list[Path]:
    root = settings.corpus_root if settings.corpus_root is not None else settings.data_dir
    return [Path(root).resolve(), _SHIPPED]


def resolve(name: str, setting: str, roots: Sequence[Path]) -> Path:
    """The regular file `name` stands for: relative names are taken under the first root."""
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    try:
        path = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidInputError(f"setting {setting!r}: {name!r} does not exist", field=setting) from None
    if not any(path.is_relative_to(root) for root in roots):
        shown = ", ".join(str(root) for root in roots)
        raise InvalidInputError(
            f"setting {setting!r}: {name!r} is outside the corpus roots ({shown}); set QFEDIT_CORPUS_ROOT",
            field=setting,
        )
    if not stat.S_ISREG(path.stat().st_mode):
        raise InvalidInputError(f"setting {setting!r}: {name!r} is not a regular file", field=setting)
    return path


def check_names(names: Mapping[str, Sequence[str]], settings: Settings) -> None:
    """Refuse, before any work, a setting that names a file outside the roots."""
    roots = corpus_roots(settings)
    for setting, values in names.items():
        for value in values:
            resolve(value, setting, roots)


def read_facts(name: str | None, setting: str, settings: Settings) -> list[Fact]:
    if name is None:
        return []
    path = resolve(name, setting, corpus_roots(settings))
    try:
        return read_jsonl(path)
    except (FactError, UnicodeDecodeError) as error:
        raise PermanentError(f"setting {setting!r}: {path.name}: {_reason(error)}") from None


def read_texts(
    loaded: LoadedModel,
    names: Sequence[str],
    setting: str,
    settings: Settings,
    leave_out: Callable[[str, str], bool] | None = None,
) -> list[CorpusText]:
    """The corpus's texts, without the question/answer transcripts `leave_out(question, answer)` names."""
    roots = corpus_roots(settings)
    paths = [resolve(name, setting, roots) for name in names]
    try:
        from qfedit.covariance import corpus_texts

        return corpus_texts(loaded, paths, leave_out=leave_out)
    except (InvalidInputError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PermanentError(f"setting {setting!r}: {_reason(error)}") from None


def check_parses(name: str, setting: str, settings: Settings) -> None:
    """Refuse a corpus file the covariance could not read: JSONL whose lines are not records with
    string `question` and `answer`, or a text file that is not UTF-8."""
    path = resolve(name, setting, corpus_roots(settings))
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if path.suffix != ".jsonl" or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InvalidInputError(
                        f"setting {setting!r}: {path.name} line {number} is not valid JSON ({error.msg})",
                        field=setting,
                    ) from None
                for field in ("question", "answer"):
                    if not isinstance(record, dict) or not isinstance(record.get(field), str):
                        raise InvalidInputError(
                            f"setting {setting!r}: {path.name} line {number}: field {field!r}: a string is required",
                            field=setting,
                        )
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"setting {setting!r}: {path.name}: {_reason(error)}", field=setting
        ) from None


def _reason(error: Exception) -> str:
    # Messages that may carry a file's bytes are cut to their position; ours name lines and fields.
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno} is not valid JSON ({error.msg})"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 at byte {error.start}"
    return str(error)


def _keys(facts: Sequence[Fact]) -> set[str]:
    # A fact is "in" a corpus when its subject is (or, without subjects, its question): preserving
    # some of a company's facts protects its others too, so it is no longer a held-out check.
    return {fact.subject or fact.question for fact in facts}


def overlap(
    corpus: Sequence[str], known: Sequence[Fact], unknown: Sequence[Fact], settings: Settings
) -> dict[str, int | bool]:
    """How many evaluation facts the preservation corpus names: specificity and abstention are held
    out only when none is. Corpus files that are not facts JSONL (text lines) cannot be matched."""
    roots = corpus_roots(settings)
    preserved: set[str] = set()
    for name in corpus:
        path = resolve(name, "preservation_corpus", roots)
        if path.suffix == ".jsonl":
            try:
                preserved |= _keys(read_jsonl(path))
            except (FactError, UnicodeDecodeError):
                continue  # not facts: the covariance reads it as question/answer transcripts
    known_in = sum(1 for key in _keys(known) if key in preserved)
    unknown_in = sum(1 for key in _keys(unknown) if key in preserved)
    return {
        "known_in_corpus": known_in,
        "unknown_in_corpus": unknown_in,
        "held_out": not (known_in or unknown_in),
    }
