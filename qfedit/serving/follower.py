"""Following an alias as it moves: the version an alias points at, read from the database and
the store, kept merged into a `VersionedModel`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qfedit.delta import Delta
from qfedit.errors import InvalidInputError
from qfedit.modeling import LoadedModel
from qfedit.serving.model import SwitchReport, VersionedModel

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from qfedit.db.models import Version
    from qfedit.store import CheckpointStore

log = logging.getLogger(__name__)


def load_version_delta(store: CheckpointStore, version: Version) -> Delta | None:
    """The version's delta, read from the store with its sha256 checked; None for version 0."""
    if version.checkpoint_path is None or version.checkpoint_sha256 is None:
        return None
    data = store.read_bytes(version.checkpoint_path, version.checkpoint_sha256)
    return Delta.from_bytes(data, f"{version.label} ({version.checkpoint_path})")


# -- following an alias ------------------------------------------------------------------


@dataclass
class FollowerState:
    version_id: int | None = None
    checked_at: float | None = None
    """Monotonic time of the last look at the database."""
    last_error: str | None = None
    """Why the last look failed (for the log and the operator: it may name hosts and paths)."""
    last_error_type: str | None = None
    """Only the type of that error (`OperationalError`): what an unauthenticated probe may see."""
    last_switch: SwitchReport | None = None


class AliasFollower:
    """Keeps a `VersionedModel` on the version an alias points at, looking at most every `poll_s`.

    `refresh()` is cheap to call before every request: between polls it returns at once, and
    while one thread polls (and maybe switches) the others go on with the current version. A
    failed poll (database down, corrupt checkpoint) is logged and kept in `state.last_error`;
    the model keeps serving the version it has, which is still a valid, labelled version.
    """

    def __init__(
        self,
        versioned: VersionedModel,
        *,
        sessions: Callable[[], Session],
        store: CheckpointStore,
        model_name: str,
        alias: str,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_s < 0:
            raise InvalidInputError(f"poll_s must be >= 0, not {poll_s}")
        self.versioned = versioned
        self.sessions = sessions
        self.store = store
        self.model_name = model_name
        self.alias = alias
        self.poll_s = poll_s
        self.clock = clock
        self.state = FollowerState()
        self._polling = threading.Lock()

    def refresh(self, *, force: bool = False) -> bool:
        """Look at the alias if it is time to; True when the served version changed."""
        now = self.clock()
        checked = self.state.checked_at
        if not force and checked is not None and now - checked < self.poll_s:
            return False
        if not self._polling.acquire(blocking=force):
            return False  # another thread is polling; serve the current version meanwhile
        try:
            self.state.checked_at = now
            return self._poll()
        except Exception as err:
            # Keep serving: the current version is still correct and labelled as what it is.
            if force:
                raise
            self.state.last_error = f"{type(err).__name__}: {err}"
            self.state.last_error_type = type(err).__name__
            log.exception(
                "following %s@%s failed; still serving %s",
                self.model_name,
                self.alias,
                self.versioned.version,
            )
            return False
        finally:
            self._polling.release()

    def _poll(self) -> bool:
        from qfedit import registry

        with self.sessions() as session:
            # An alias moves; a version number (`demo@3` pinned) resolves to the same version forever.
            version = registry.get_version(session, f"{self.model_name}@{self.alias}")
            if version.id == self.state.version_id:
                self.state.last_error = self.state.last_error_type = None
                return False
            label = version.label
            delta = load_version_delta(self.store, version)
            version_id = version.id
        log.info("alias %s@%s now points at %s", self.model_name, self.alias, label)
        report = self.versioned.switch_to(delta, label)
        self.state.version_id = version_id
        self.state.last_switch = report
        self.state.last_error = self.state.last_error_type = None
        return True


def follow_alias(
    loaded: LoadedModel,
    *,
    sessions: Callable[[], Session],
    store: CheckpointStore,
    model_name: str,
    alias: str,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> AliasFollower:
    """A follower on `loaded`, already serving the alias's current version. `alias` may also be a
    version number: the follower then stays on that version (`qfedit serve demo@3`).

    Refuses a loaded model whose weights are not the registered base (by fingerprint): every
    version's delta was solved for those weights, and version 0 must be them.
    """
    from qfedit import registry
    from qfedit.delta import DeltaMismatchError

    with sessions() as session:
        model = registry.get_model(session, model_name)
        registry.get_version(session, f"{model_name}@{alias}")  # a clear error now, not at the first poll
        mismatch = registry.base_mismatch(model, loaded.fingerprint, str(loaded.path))
        base_label = f"{model.name}@0"
    if mismatch:
        raise DeltaMismatchError(mismatch)
    follower = AliasFollower(
        VersionedModel(loaded, base_label=base_label),
        sessions=sessions,
        store=store,
        model_name=model_name,
        alias=alias,
        poll_s=poll_s,
        clock=clock,
    )
    follower.refresh(force=True)
    return follower
