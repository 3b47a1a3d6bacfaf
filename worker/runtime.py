"""Per-process state of a worker: database engine, store and loaded models, made on first use.

Created inside the process that runs the tasks (the solo pool runs them in the worker process
itself), never in a parent that forks, so a CUDA context and a model are never shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from qfedit.config import Settings
from qfedit.cpu import CpuTokens, host_tokens
from qfedit.db import engine_from_settings, session_factory
from qfedit.pipeline.steps import ModelCache
from qfedit.store import CheckpointStore, store_from_settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    store: CheckpointStore
    models: ModelCache
    cpu: CpuTokens | None
    """The host's cores, shared with the other workers on it (`qfedit.cpu.host_tokens`)."""


def make_runtime(settings: Settings) -> Runtime:
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    cpu = host_tokens(settings)
    log.info(
        "worker: torch uses %d CPU threads (QFEDIT_TORCH_THREADS)%s",
        torch.get_num_threads(),
        f"; a solve borrows idle cores of the {cpu.cores} shared in {cpu.folder}" if cpu else "",
    )
    return Runtime(
        settings=settings,
        sessions=session_factory(engine_from_settings(settings)),
        store=store_from_settings(settings),
        models=ModelCache(settings),
        cpu=cpu,
    )
