"""Spot-check generation: one loaded base model per name, switched to the version asked for.

Built on `qfedit.serving.VersionedModel`, which merges a version's delta into the weights (and
switching applies only the difference). The models live on the app, not in a module global, so
each app (and each test) has its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from qfedit import registry
from qfedit.config import Settings
from qfedit.db.models import Model, Version
from qfedit.serving import Answer, VersionedModel, load_version_delta
from qfedit.store import CheckpointStore


@dataclass
class _Slot:
    versioned: VersionedModel
    version_id: int | None
    # Held across switch and answer: the API serves any version on request, so two requests
    # for different versions must not interleave (the answer must come from the one asked for).
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelUnavailableError(RuntimeError):
    """The registered base weights cannot be loaded here (moved, not on this machine, or changed)."""


class Generators:
    """The process's loaded models, by name; a model is loaded on its first request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots: dict[str, _Slot] = {}
        self._loading = threading.Lock()

    def _slot(self, model: Model) -> _Slot:
        with self._loading:
            slot = self._slots.get(model.name)
            if slot is None:
                from qfedit.modeling import load_model

                try:
                    loaded = load_model(model.source, dtype=self.settings.dtype, device=self.settings.device)
                except (OSError, ValueError) as err:
                    raise ModelUnavailableError(
                        f"cannot load model {model.name!r} from {model.source}: {err}"
                    ) from err
                mismatch = registry.base_mismatch(model, loaded.fingerprint, model.source)
                if mismatch:
                    raise ModelUnavailableError(mismatch)
                slot = _Slot(VersionedModel(loaded, base_label=f"{model.name}@0"), version_id=None)
                self._slots[model.name] = slot
            return slot

    def answer(
        self,
        model: Model,
        version: Version,
        store: CheckpointStore,
        question: str,
        context: str | None,
        *,
        max_new_tokens: int,
    ) -> Answer:
        slot = self._slot(model)
        with slot.lock:
            if slot.version_id != version.id:
                slot.versioned.switch_to(load_version_delta(store, version), version.label)
                slot.version_id = version.id
            return slot.versioned.answer(question, context, max_new_tokens=max_new_tokens)
