"""Whether an edit can run with a model's settings, checked before anything is captured.

A batch that fails after its capture has spent the capture: minutes to hours of GPU time at
corpus scale. So registration, configuration and submission all refuse what would fail later
for a reason visible now: a rule without its corpus, a layer the model does not have, a file a
worker cannot open or (at registration and configuration) cannot parse.
"""

from __future__ import annotations

import json
from pathlib import Path

from qfedit.config import Settings
from qfedit.errors import InvalidInputError, PermanentError
from qfedit.pipeline import corpora
from qfedit.pipeline.settings import ModelSettings


def model_depth(source: str) -> int | None:
    """The number of decoder layers a local model directory's `config.json` states; None when it
    states none (the weights are checked when they load)."""
    path = Path(source) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def check_runnable(
    settings: ModelSettings, *, source: str, app: Settings, parse: bool = False, field: str = "settings"
) -> None:
    """Refuse settings an edit cannot run with, naming the setting and the reason. `parse` also reads
    every file the settings name (registration and configuration, not every submission)."""
    edit = settings.edit
    if edit.solve.rule == "preserve" and not settings.corpus():
        raise InvalidInputError(
            f"field '{field}.preservation_corpus': the preserving rule (solve.rule=preserve) needs a "
            "preservation corpus or known facts; give --preserve FILE or --known FILE, a --preset, or "
            "solve.rule=seed for QF's rule without preservation",
            field=f"{field}.preservation_corpus",
        )
    depth = model_depth(source)
    if depth is not None and max(edit.edited_layers) >= depth:
        where = "edit.layers" if edit.layers else "edit.layer"
        raise InvalidInputError(
            f"field '{field}.{where}': layer {max(edit.edited_layers)} is out of range; the model has "
            f"{depth} layers (0-{depth - 1})",
            field=f"{field}.{where}",
        )
    names = {
        "preservation_corpus": list(settings.preservation_corpus),
        "known_facts": [settings.known_facts] if settings.known_facts else [],
        "unknown_questions": [settings.unknown_questions] if settings.unknown_questions else [],
    }
    corpora.check_names(names, app)
    if not parse:
        return
    for setting in ("known_facts", "unknown_questions"):
        try:
            corpora.read_facts(getattr(settings, setting), setting, app)
        except PermanentError as error:
            raise InvalidInputError(str(error), field=f"{field}.{setting}") from None
    for name in settings.preservation_corpus:
        corpora.check_parses(name, "preservation_corpus", app)
