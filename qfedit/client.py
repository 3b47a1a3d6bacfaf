"""A small typed client for qfedit's HTTP API (`qfedit api`), for scripts and notebooks.

    from qfedit.client import Client

    with Client("http://127.0.0.1:8000", token=os.environ["QFEDIT_TOKEN"]) as qf:
        qf.import_facts("demo", Path("facts.jsonl"))
        batch = qf.submit_batch("demo", idempotency_key="2026-12-07-import")
        batch = qf.wait_batch(batch["id"])
        qf.set_alias("demo", "production", batch["version"], reason="passed review")
        print(qf.generate("demo", "Who founded Oxinnovate?", version="production")["answer"])

Each method is one route (the README's "HTTP API" lists them) and returns its JSON; a refusal
raises `ApiError` with the route's status, code, message and the field at fault.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ENDED = frozenset({"published", "failed", "cancelled"})


class ApiError(Exception):
    """A refusal of the API: `status` (HTTP), `code` (`invalid`, `not_found`, ...), `message`,
    and `field`, the request field at fault where there is one."""

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" ({field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


class Client:
    def __init__(
        self, url: str, token: str, *, timeout: float = 60.0, http: httpx.Client | None = None
    ) -> None:
        """`http`: an httpx client of the caller's (its transport, proxies, certificates), whose
        base URL is the API's; `url` is then unused."""
        self._http = http or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._auth = {"Authorization": f"Bearer {token}"}

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self._auth, **kwargs.pop("headers", {})}
        reply = self._http.request(method, path, headers=headers, **kwargs)
        if reply.is_success:
            return reply.json()
        try:
            body = reply.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        raise ApiError(
            reply.status_code,
            str(body.get("error", "http_error")),
            str(body.get("message", reply.text[:500])),
            body.get("field"),
        )

    # Models, facts and batches.
    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/models"))

    def import_facts(
        self, model: str, path: Path, *, fmt: str | None = None, source: str = "api-upload"
    ) -> dict[str, Any]:
        """Upload a JSONL or CSV file (streamed); the result counts what was imported and rejected."""
        params = {"source": source} | ({"format": fmt} if fmt else {})
        kind = "text/csv" if path.suffix.lower() == ".csv" else "application/x-ndjson"
        with path.open("rb") as body:
            return dict(
                self._call(
                    "POST",
                    f"/v1/models/{model}/facts/import",
                    params=params,
                    content=body,
                    headers={"Content-Type": kind},
                )
            )

    def facts(
        self, model: str | None = None, *, status: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if model:
            params["model"] = model
        if status:
            params["status"] = status
        return dict(self._call("GET", "/v1/facts", params=params))

    def submit_batch(
        self,
        model: str,
        fact_ids: list[int] | None = None,
        *,
        hyperparameters: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue an edit of `fact_ids` (default: every pending fact); the same key makes one batch."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"fact_ids": fact_ids, "hyperparameters": hyperparameters}
        return dict(self._call("POST", f"/v1/models/{model}/batches", json=body, headers=headers))

    def batch(self, batch_id: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/batches/{batch_id}"))

    def wait_batch(self, batch_id: int, *, timeout: float = 3600.0, every: float = 2.0) -> dict[str, Any]:
        """Poll until the batch is published, failed or cancelled; `TimeoutError` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if batch["status"] in ENDED:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout:.0f} s")
            time.sleep(every)

    # Versions and aliases.
    def versions(self, model: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/models/{model}/versions"))

    def version(self, model: str, ref: str | int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/models/{model}/versions/{ref}"))

    def set_alias(
        self, model: str, name: str, version: str | int, *, reason: str, expect_revision: int | None = None
    ) -> dict[str, Any]:
        """Move `name` to `version` (a number or a version label such as `demo@3`, or another alias);
        with `expect_revision`, only if the alias is still at that revision (compare-and-set)."""
        ref = str(version).rsplit("@", 1)[-1]
        body: dict[str, Any] = {"version": ref, "reason": reason}
        if expect_revision is not None:
            body["expect_revision"] = expect_revision
        return dict(self._call("PUT", f"/v1/models/{model}/aliases/{name}", json=body))

    def generate(
        self, model: str, question: str, *, context: str | None = None, version: str | int = "production"
    ) -> dict[str, Any]:
        """The answer of `version` (a number or an alias) to `question`, greedy."""
        body = {"question": question, "context": context, "version": str(version)}
        return dict(self._call("POST", f"/v1/models/{model}/generate", json=body))
