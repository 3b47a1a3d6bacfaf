"""The registry: what the database says about models, facts, batches, versions and aliases.

    from qfedit import registry
    model = registry.get_model(session, "demo")
    version = registry.get_version(session, "demo@production")

One module per room (`models`, `facts`, `batches`, `versions`, `aliases`, `audit`); this package
gathers their public functions under one name. Every function takes a `Session` and never
commits: the caller owns the transaction, so a task or a request can combine several calls into
one atomic change, and every change that matters to a model's history writes its audit entry in
the same transaction. How batches move through their statuses is `qfedit.pipeline.lifecycle`.
"""

from qfedit.errors import ConflictError, NotFoundError
from qfedit.registry.aliases import alias_history, aliases_by_version, get_alias, list_aliases, set_alias
from qfedit.registry.audit import list_audit, object_names, record_audit
from qfedit.registry.base import UNSET, digest_of_hashes
from qfedit.registry.batches import (
    batch_fact_count,
    batch_fact_ids,
    batch_id_for_key,
    create_batch,
    get_batch,
    list_batches,
    version_of_batch,
)
from qfedit.registry.facts import (
    FactPreview,
    count_facts,
    fact_previews,
    get_fact,
    list_fact_ids,
    list_facts,
    load_facts,
    set_fact_status,
)
from qfedit.registry.models import add_model, base_mismatch, get_model, list_models
from qfedit.registry.notes import archive_version, describe_model, describe_version
from qfedit.registry.versions import (
    VersionDiff,
    diff_versions,
    get_version,
    latest_version,
    list_versions,
    record_version,
    referenced_checkpoints,
    version_fact_ids,
    versions_with_fact,
    weight_difference_norm,
)
from qfedit.registry.workers import forget_worker, heartbeat, listening, live_workers

__all__ = [
    "UNSET",
    "ConflictError",
    "FactPreview",
    "NotFoundError",
    "VersionDiff",
    "add_model",
    "alias_history",
    "aliases_by_version",
    "archive_version",
    "base_mismatch",
    "batch_fact_count",
    "batch_fact_ids",
    "batch_id_for_key",
    "count_facts",
    "create_batch",
    "describe_model",
    "describe_version",
    "diff_versions",
    "digest_of_hashes",
    "fact_previews",
    "forget_worker",
    "get_alias",
    "get_batch",
    "get_fact",
    "get_model",
    "get_version",
    "heartbeat",
    "latest_version",
    "list_aliases",
    "list_audit",
    "list_batches",
    "list_fact_ids",
    "list_facts",
    "list_models",
    "list_versions",
    "listening",
    "live_workers",
    "load_facts",
    "object_names",
    "record_audit",
    "record_version",
    "referenced_checkpoints",
    "set_alias",
    "set_fact_status",
    "version_fact_ids",
    "version_of_batch",
    "versions_with_fact",
    "weight_difference_norm",
]
