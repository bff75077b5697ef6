"""docker-compose.yml, checked by parsing (no Docker engine runs here, FACTS.md).

:func:`problems` lists what an operator would trip over: a missing service, image, healthcheck,
GPU reservation, volume or setting. The file must have none, and removing any required piece
must be reported.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from loopscribe.stack import _generated_defaults
from ml_backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LS_IMAGE = "heartexlabs/label-studio:1.23.2"
HOME = "/data/loopscribe"
GPU_SERVICES = ("ml-backend", "worker")
# read by the code outside Settings: the local stack's own paths (not used in containers), and CUDA's own
# device list (set in containers by the NVIDIA runtime, then narrowed by WORKER_GPU)
LOCAL_ONLY = {"LOOPSCRIBE_ENV_FILE", "LABEL_STUDIO_VENV", "LOOPSCRIBE_SHARED_AUDIO", "XDG_DATA_HOME",
              "CUDA_VISIBLE_DEVICES"}
LABEL_STUDIO_REQUIRED = {
    "DJANGO_DB": "default", "POSTGRE_HOST": "postgres", "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
    "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": f"{HOME}/media", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
}
LABEL_STUDIO_SECRETS = ("POSTGRE_PASSWORD", "SECRET_KEY", "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD",
                        "LABEL_STUDIO_USER_TOKEN")
MOUNTS = {  # service → {named volume: mount point}
    "postgres": {"postgres-data": "/var/lib/postgresql/data"},
    "redis": {"redis-data": "/data"},
    "label-studio": {"label-studio-data": "/label-studio/data", "media": f"{HOME}/media"},
    "ml-backend": {"loopscribe-data": HOME, "models": f"{HOME}/models", "media": f"{HOME}/media"},
    "worker": {"loopscribe-data": HOME, "models": f"{HOME}/models", "media": f"{HOME}/media"},
}


def env_vars_read_by_code() -> set[str]:
    pattern = re.compile(r"""(?:environ(?:\.get)?\(?\[?|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    names = set()
    for package in ("ml_backend", "training", "loopscribe"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names | set(Settings.env_names())


def env_example_keys(text: str) -> tuple[set[str], set[str]]:
    """(keys with a line, commented or not; keys set uncommented)."""
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))
    active = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, re.M))
    return listed, active


def _volumes(service: dict) -> dict[str, str]:
    out = {}
    for v in service.get("volumes") or []:
        source, target = (v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target")))
        out[source] = target
    return out


def problems(compose: dict, env_example: str) -> list[str]:
    found: list[str] = []
    services = compose.get("services") or {}
    for name in MOUNTS:
        if name not in services:
            found.append(f"service {name} missing")
    if found:
        return found
    if services["label-studio"].get("image") != LS_IMAGE:
        found.append(f"label-studio image is not {LS_IMAGE}")
    if not str(services["postgres"].get("image", "")).startswith("postgres:"):
        found.append("postgres image")
    if not str(services["redis"].get("image", "")).startswith("redis:"):
        found.append("redis image")
    if "build" not in services["ml-backend"] or services["worker"].get("image") != services["ml-backend"].get("image"):
        found.append("ml-backend builds the image the worker runs")
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        if not test or (service.get("healthcheck") or {}).get("disable"):
            found.append(f"{name}: no healthcheck")
    for name in GPU_SERVICES:
        devices = (((services[name].get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
            "devices") or []
        if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
            found.append(f"{name}: no GPU reservation")
    if "BACKEND_REPLICAS" not in str((services["ml-backend"].get("deploy") or {}).get("replicas", "")):
        found.append("ml-backend: no replicas (BACKEND_REPLICAS)")
    worker_devices = (((services["worker"].get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices") or []
    if not any(d.get("count") == "all" for d in worker_devices):
        found.append("worker: does not see every GPU (each worker picks one: WORKER_GPU=claim)")
    if not str((services["worker"].get("environment") or {}).get("WORKER_GPU", "")).startswith("${WORKER_GPU:-claim"):
        found.append("worker: WORKER_GPU does not default to claim")
    declared = set(compose.get("volumes") or {})
    for name, wanted in MOUNTS.items():
        mounted = _volumes(services[name])
        for volume, target in wanted.items():
            if mounted.get(volume) != target:
                found.append(f"{name}: volume {volume} not mounted at {target}")
            if volume not in declared:
                found.append(f"volume {volume} not declared")
        for volume in mounted:
            if not volume.startswith((".", "/")) and volume not in declared:
                found.append(f"{name}: volume {volume} not declared")
    for name in GPU_SERVICES:
        env = services[name].get("environment") or {}
        for var in sorted(env_vars_read_by_code() - LOCAL_ONLY):
            if var not in env:
                found.append(f"{name}: {var} not set")
        if env.get("LOOPSCRIBE_HOME") != HOME:
            found.append(f"{name}: LOOPSCRIBE_HOME is not {HOME}")
        if not str(env.get("LABEL_STUDIO_URL", "")).startswith("http://label-studio:"):
            found.append(f"{name}: LABEL_STUDIO_URL does not point at the label-studio service")
        if not str(env.get("BACKEND_URL", "")).startswith("http://proxy:"):
            found.append(f"{name}: BACKEND_URL does not point at the proxy in front of the backend")
        if not str(env.get("REDIS_URL", "")).startswith("redis://redis:"):
            found.append(f"{name}: REDIS_URL does not point at the redis service")
    found += proxy_problems(services)
    ls_env = services["label-studio"].get("environment") or {}
    for var, value in LABEL_STUDIO_REQUIRED.items():
        if str(ls_env.get(var)) != value:
            found.append(f"label-studio: {var} must be {value}")
    for var in LABEL_STUDIO_SECRETS:
        if not ls_env.get(var):
            found.append(f"label-studio: {var} not set")
    if "LABEL_STUDIO_API_KEY" not in str(ls_env.get("LABEL_STUDIO_USER_TOKEN")):
        found.append("label-studio: its user token is not the backend's LABEL_STUDIO_API_KEY")
    listed, active = env_example_keys(env_example)
    text = yaml.safe_dump(compose)
    for var in sorted(set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))):
        if var not in listed:
            found.append(f".env.example: {var} (used by compose) missing")
    for var in sorted(set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", text))):
        if var not in active:
            found.append(f".env.example: required {var} must have a line to fill in")
    for var in sorted(set(Settings.env_names()) | set(_generated_defaults())):
        if var not in listed:
            found.append(f".env.example: {var} missing")
    return found


def proxy_problems(services: dict) -> list[str]:
    """The backend is reached only through nginx (slow clients wait there), configured from the template."""
    found = []
    proxy = services.get("proxy")
    if proxy is None:
        return ["service proxy missing"]
    if not str(proxy.get("image", "")).startswith("nginx:"):
        found.append("proxy image is not nginx")
    if services["ml-backend"].get("ports"):
        found.append("ml-backend publishes a port: clients must go through the proxy")
    if not proxy.get("ports"):
        found.append("proxy publishes no port")
    template = "./deploy/nginx/loopscribe.conf.template"
    if not str(_volumes(proxy).get(template, "")).startswith("/etc/nginx/templates/"):
        found.append(f"proxy: {template} not mounted into /etc/nginx/templates/")
    for var in ("CLIENT_TIMEOUT", "MAX_REQUEST_BYTES"):
        if var not in (proxy.get("environment") or {}):
            found.append(f"proxy: {var} not set (the template reads it)")
    template_text = (ROOT / "deploy" / "nginx" / "loopscribe.conf.template").read_text()
    if "resolver 127.0.0.11" not in template_text or "http://ml-backend:9091" not in template_text:
        found.append("proxy: the template does not look the backend replicas up in Docker's DNS")
    if "0.0.0.0:9091" not in services["ml-backend"].get("command", []):
        found.append("ml-backend does not listen where the proxy template sends requests (ml-backend:9091)")
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> str:
    return (ROOT / ".env.example").read_text()


def test_compose_file_is_complete(compose, env_example):
    assert problems(compose, env_example) == []


def _without(compose: dict, path: tuple, key) -> dict:
    broken = copy.deepcopy(compose)
    node = broken
    for part in path:
        node = node[part]
    if isinstance(node, list):
        node.remove(next(item for item in node if str(item).startswith(key)))
    else:
        del node[key]
    return broken


@pytest.mark.parametrize("path, key, expected", [
    (("services", "worker", "environment"), "TRAIN_EPOCHS", "worker: TRAIN_EPOCHS not set"),
    (("services", "ml-backend", "environment"), "WEBHOOK_SECRET", "ml-backend: WEBHOOK_SECRET not set"),
    (("services", "worker", "environment"), "REDIS_URL", "worker: REDIS_URL not set"),
    (("services", "label-studio", "environment"), "LABEL_STUDIO_ML_BLOCK_LOCAL_IP", "LABEL_STUDIO_ML_BLOCK_LOCAL_IP"),
    (("services", "worker", "volumes"), "models:", "worker: volume models not mounted"),
    (("services", "label-studio", "volumes"), "media:", "label-studio: volume media not mounted"),
    (("volumes",), "loopscribe-data", "volume loopscribe-data not declared"),
    (("services", "worker", "deploy"), "resources", "worker: no GPU reservation"),
    (("services", "ml-backend", "deploy"), "replicas", "ml-backend: no replicas"),
    (("services", "worker", "environment"), "WORKER_GPU", "worker: WORKER_GPU does not default to claim"),
    (("services", "redis"), "healthcheck", "redis: no healthcheck"),
    (("services",), "postgres", "service postgres missing"),
    (("services",), "proxy", "service proxy missing"),
    (("services", "proxy", "environment"), "CLIENT_TIMEOUT", "proxy: CLIENT_TIMEOUT not set"),
    (("services", "proxy", "volumes"), "./deploy", "proxy: ./deploy/nginx/loopscribe.conf.template not mounted"),
])
def test_removing_a_required_piece_is_reported(compose, env_example, path, key, expected):
    # the anchors make backend and worker share one mapping: break a copy of one service only
    compose = copy.deepcopy(compose)
    for name in GPU_SERVICES:
        compose["services"][name]["environment"] = dict(compose["services"][name]["environment"])
        compose["services"][name]["volumes"] = list(compose["services"][name]["volumes"])
    found = problems(_without(compose, path, key), env_example)
    assert any(expected in p for p in found), found


def test_env_example_missing_a_secret_is_reported(compose, env_example):
    broken = re.sub(r"^POSTGRES_PASSWORD=.*$", "", env_example, flags=re.M)
    assert ".env.example: required POSTGRES_PASSWORD must have a line to fill in" in problems(compose, broken)


def test_a_new_setting_the_code_reads_must_reach_the_containers(compose, env_example, monkeypatch):
    monkeypatch.setattr(Settings, "env_names", classmethod(lambda cls: ["LOOPSCRIBE_NEW_KNOB"]))
    found = problems(compose, env_example)
    assert "worker: LOOPSCRIBE_NEW_KNOB not set" in found and ".env.example: LOOPSCRIBE_NEW_KNOB missing" in found


def test_backend_port_published_is_reported(compose, env_example):
    broken = copy.deepcopy(compose)
    broken["services"]["ml-backend"]["ports"] = ["9090:9091"]
    assert "ml-backend publishes a port: clients must go through the proxy" in problems(broken, env_example)


def test_compose_proxy_template_is_generated_from_the_code():
    from loopscribe.proxy import COMPOSE_TEMPLATE, compose_template

    assert (ROOT / COMPOSE_TEMPLATE).read_text() == compose_template(), \
        "regenerate: loopscribe config --proxy-template > deploy/nginx/loopscribe.conf.template"


def test_dockerfile_serves_what_compose_runs(compose):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "loopscribe.wsgi:app" in dockerfile and "loopscribe.wsgi:app" in compose["services"]["ml-backend"]["command"]
    assert f"LOOPSCRIBE_HOME={HOME}" in dockerfile and "torch==${TORCH_VERSION}" in dockerfile
    assert "loopscribe.jobs.huey" in compose["services"]["worker"]["command"]


def test_env_example_is_a_working_local_env_file(tmp_path, env_example):
    """Copied to .env, the example works for the local stack: its empty secrets are generated."""
    from loopscribe.stack import ensure_env_file

    env = tmp_path / ".env"
    env.write_text(env_example)
    values = ensure_env_file(env)
    assert all(values[k] for k in _generated_defaults())
    assert values["LABEL_STUDIO_USERNAME"] == "admin@example.com"
