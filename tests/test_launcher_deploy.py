"""The compose stack's configuration agrees with the settings and the launcher (no docker)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from contract.constants import ENV_PREFIX
from contract.settings import Settings
from worker.launcher import child_commands

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def test_every_setting_in_env_reaches_the_bertstream_services() -> None:
    compose = _load("docker-compose.yml")
    shared = set(compose["x-bertstream-env"])
    for field in dataclasses.fields(Settings):
        key = ENV_PREFIX + field.name.upper()
        if key == "BERTSTREAM_API_TOKENS":  # a secret: the API's only
            assert key in compose["services"]["api"]["environment"]
            assert key not in shared
        else:
            assert key in shared, f"{key} does not reach the containers"


def test_prometheus_scrapes_every_launcher_child() -> None:
    compose = _load("docker-compose.yml")
    base = int(compose["services"]["worker-gpu"]["environment"]["BERTSTREAM_METRICS_PORT"])
    jobs = _load("deploy/prometheus.yml")["scrape_configs"]
    scraped = {(name, sd["port"]) for job in jobs for sd in job.get("dns_sd_configs", [])
               for name in sd["names"]}
    eight = child_commands([str(g) for g in range(8)], Settings(metrics_port=base), host="h")
    for _, env in eight:
        assert ("worker-gpu", int(env["BERTSTREAM_METRICS_PORT"])) in scraped
    assert ("worker-cpu", 9100) in scraped
