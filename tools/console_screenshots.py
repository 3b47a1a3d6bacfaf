"""Screenshots of every console page, on the demo's own data (`make screenshots`).

    python tools/console_screenshots.py [--out docs/console]

In a fresh data folder: two demo runs through the embedded queue (versions 1 and 2 of `demo`,
made by the real worker), `production` moved twice, then `qfedit api` with a read token, and
Chromium from the operating system (`/usr/bin/chromium`) opening each page at 1200 px wide and
the model page at 390 px (a phone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "console-screenshots-read-token-0123456789"


def _run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"qfedit {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.3)


def _shoot(page: Page, url: str, ready: str, path: Path) -> None:
    page.goto(url)
    page.wait_for_selector(ready)
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "QFEDIT_DATA_DIR": str(Path(tmp) / "data"),
            "QFEDIT_API_TOKENS": json.dumps({"auditor": {"token": TOKEN, "scope": "read"}}),
            "QFEDIT_ACTOR": "alice",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        for key in ("QFEDIT_DATABASE_URL", "QFEDIT_BROKER_URL", "QFEDIT_STORE_URL"):
            env.pop(key, None)
        _run(env, "demo", "--facts", "20", "--updates", "1")
        _run(env, "alias", "set", "production", "demo@1", "--reason", "first edit passed its gates")
        _run(env, "demo", "--facts", "40", "--updates", "2")
        _run(env, "alias", "set", "production", "demo@2", "--reason", "20 more facts; quality held")
        port = _port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(base + "/healthz", server)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                _shoot(page, base + "/ui/", "#login:not([hidden])", args.out / "sign-in.png")
                page.fill("#token", TOKEN)
                page.click("#login button[type=submit]")
                page.wait_for_selector("main h1:text('Models')")
                page.screenshot(path=str(args.out / "models.png"), full_page=True)
                print(f"wrote {(args.out / 'models.png').relative_to(ROOT)}")
                _shoot(page, base + "/ui/models/demo", "svg.chart", args.out / "model.png")
                _shoot(
                    page, base + "/ui/models/demo/versions/2", "table[data-diff]", args.out / "version.png"
                )
                fact_id = page.locator("table[data-diff] tbody a").first.inner_text()
                _shoot(page, f"{base}/ui/facts/{fact_id}", "ul[data-ranges]", args.out / "fact.png")
                _shoot(page, base + "/ui/facts?q=founded&model=demo", "table", args.out / "search.png")
                _shoot(page, base + "/ui/audit?model=demo", "table", args.out / "audit.png")
                phone = browser.new_page(viewport={"width": 390, "height": 844})
                phone.goto(base + "/ui/")
                phone.fill("#token", TOKEN)
                phone.click("#login button[type=submit]")
                phone.wait_for_selector("main h1:text('Models')")
                _shoot(phone, base + "/ui/models/demo", "svg.chart", args.out / "model-narrow.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
