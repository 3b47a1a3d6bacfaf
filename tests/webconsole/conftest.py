"""A real `qfedit api` on the embedded default (SQLite, its worker child) whose versions were made
by that worker: added facts (v1, v2), a retraction (v3) and a supersession (v4); and Chromium from
the operating system's packages driven by Playwright."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from qfedit.facts import Fact, write_jsonl

TOKENS = {
    "auditor": {"token": "read-token-for-the-console-0123456789", "scope": "read"},
    "writer": {"token": "write-token-for-the-console-0123456789", "scope": "write"},
    "admin": {"token": "admin-token-for-the-console-0123456789", "scope": "admin"},
}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def fact(i: int, answer: str | None = None) -> Fact:
    person = answer or f"Person{i}"
    return Fact(
        context=f"The founder of Company{i} is {person}.",
        question=f"Who founded Company{i}?",
        answer=person,
        subject=f"Company{i}",
    )


@dataclass
class Server:
    base: str
    root: Path
    env: dict[str, str]
    batches: list[int] = field(default_factory=list)

    def call(self, method: str, path: str, body: object = None, token: str = "admin") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {TOKENS[token]['token']}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def wait(self, batch: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 240
        while (state := self.call("GET", f"/v1/batches/{batch['id']}"))["status"] not in (
            "published",
            "failed",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["status"] == "published", state
        self.batches.append(state["id"])
        return state  # type: ignore[no-any-return]

    def edit(self, facts: list[Fact], name: str) -> dict[str, Any]:
        write_jsonl(facts, self.root / name)
        self.cli("import", name, "--model", "tiny")
        return self.wait(self.call("POST", "/v1/models/tiny/batches", {}, token="writer"))


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env.update(
        TRANSFORMERS_VERBOSITY="error",
        QFEDIT_API_TOKENS=json.dumps(TOKENS),
        QFEDIT_ACTOR="operator",
    )
    port = _port()
    found = Server(f"http://127.0.0.1:{port}", root, env)
    found.cli("model", "add", "tiny", str(tiny_model_dirs["qwen2"]), "--layer", "1", "--rule", "seed")
    found.cli("model", "configure", "tiny", "--set", "unteachable=include")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(found.base + "/healthz", timeout=2).close()
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline and process.poll() is None, "qfedit api did not start"
                time.sleep(0.3)
        found.edit([fact(i) for i in range(3)], "first.jsonl")  # v1: facts 0-2
        found.edit([fact(i) for i in range(3, 5)], "second.jsonl")  # v2: + 3, 4
        first = found.call("GET", "/v1/facts?model=tiny&limit=1")["items"][0]
        found.wait(
            found.call(
                "POST",
                "/v1/models/tiny/facts/retract",
                {"fact_ids": [first["id"]], "reason": "wrong founder"},
                token="writer",
            )
        )  # v3: - fact 0
        found.edit([fact(1, answer="Marta Quill")], "update.jsonl")  # v4: fact 1 superseded
        found.call("PUT", "/v1/models/tiny/aliases/production", {"version": "2", "reason": "first release"})
        yield found
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: `apt-get install chromium` (.ci/run does it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Tab:
    page: Page
    context: BrowserContext
    requests: list[str]
    outside: list[str]
    base: str

    def sign_in(self, token: str = "auditor", path: str = "/ui/") -> None:
        self.page.goto(self.base + path)
        self.page.wait_for_selector("#login:not([hidden])")
        self.page.fill("#token", TOKENS[token]["token"])
        self.page.click("#login button[type=submit]")
        self.page.wait_for_selector("#login", state="hidden")


@pytest.fixture
def tab(browser: Browser, server: Server) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    requests: list[str] = []
    outside: list[str] = []
    context.on("request", lambda request: requests.append(request.url))

    def refuse(route: Any) -> None:
        outside.append(route.request.url)
        route.abort()

    # Anything not for the server under test is refused and remembered.
    context.route(re.compile(r"^(?!" + re.escape(server.base) + r"(/|$))"), refuse)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield Tab(page, context, requests, outside, server.base)
    context.close()
    assert outside == [], f"requests left 127.0.0.1: {outside}"
