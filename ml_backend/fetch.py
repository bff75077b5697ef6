"""Fetch task audio the way Label Studio stores it, from allowed hosts only, within size limits.

Task data holds one of: an upload (``/data/upload/…``), a local file
(``/data/local-files/?d=…``), an absolute http(s) URL, or a cloud URI (``s3://``,
``gs://``, ``azure-blob://``) that Label Studio presigns. Label Studio paths need the
backend's own token: a legacy token is sent as ``Token``; a personal access token (a
JWT refresh token) is exchanged for a 5-minute access token sent as ``Bearer``.

The token opens every Label Studio API, so it goes only to Label Studio's *media* routes:
``/data/upload/…``, ``/data/local-files/?d=…`` and the storage presign route of the task
being fetched (``/tasks/<that task's id>/presign/?fileuri=…``). Any other Label Studio path
(``/api/…``) is refused, on the first request and on every redirect; other hosts must be in
``ALLOWED_AUDIO_HOSTS`` (presigned cloud URLs too: name the bucket's host there).
"""

from __future__ import annotations

import base64
import posixpath
import re
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit

import requests

from .errors import AudioError
from .safelog import clip
from .settings import Settings

CLOUD_SCHEMES = {"s3", "gs", "gcs", "azure-blob", "azure"}
MAX_REDIRECTS = 5
MEDIA_PREFIXES = ("/data/upload/", "/data/local-files/")
PRESIGN_PATH = re.compile(r"/tasks/(\d+)/presign/?")
ACCESS_TOKEN_SECONDS = 240  # Label Studio access tokens live 5 minutes


class AudioFetchError(AudioError):
    """Task audio that cannot be fetched: bad reference, host or path not allowed, HTTP error, too large."""


class LabelStudioAuth:
    """The Authorization header for Label Studio API and media requests (token never logged)."""

    def __init__(self, base_url: str, api_key: str, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session or requests.Session()
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @property
    def is_personal_access_token(self) -> bool:
        return self._key.count(".") == 2  # JWT

    def header(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not self.is_personal_access_token:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                r = self._session.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self._key}, timeout=10)
                if r.status_code != 200:
                    raise AudioFetchError("label studio",
                                          f"personal access token refresh failed (HTTP {r.status_code})")
                self._access = (r.json()["access"], time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}


class AudioFetcher:
    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self.session = session or requests.Session()
        self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key, self.session)
        self.ls_host = urlsplit(settings.label_studio_url).netloc.lower()
        self.allowed = {self.ls_host} | {h.lower() for h in settings.allowed_audio_hosts}

    def _is_label_studio(self, url: str) -> bool:
        return urlsplit(url).netloc.lower() == self.ls_host

    def _allowed(self, url: str, task_id: int | None) -> str | None:
        """Why ``url`` may not be fetched, or None when it may."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return f"scheme {parts.scheme!r} is not http(s)"
        if self._is_label_studio(url):
            return None if is_media_path(url, task_id) else (
                f"not a Label Studio media path ({', '.join(MEDIA_PREFIXES)} or this task's presign route)")
        host = (parts.hostname or "").lower()
        if parts.netloc.lower() in self.allowed or host in self.allowed:
            return None
        return f"host {clip(parts.netloc)!r} is not in ALLOWED_AUDIO_HOSTS"

    def url_for(self, reference: str, task_id: int | None = None) -> str:
        """The URL to download: a Label Studio media path, an allowed host's URL, or a presign route."""
        scheme = urlsplit(reference).scheme.lower()
        if reference.startswith("/") and not reference.startswith("//"):
            url = f"{self.settings.label_studio_url}{reference}"
        elif scheme in ("http", "https"):
            url = reference
        elif scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise AudioFetchError(reference, "cloud URI without a task id cannot be presigned")
            encoded = base64.urlsafe_b64encode(reference.encode()).decode()
            url = f"{self.settings.label_studio_url}/tasks/{task_id}/presign/?fileuri={encoded}"
        else:
            raise AudioFetchError(reference, "unsupported audio reference (expected a Label Studio media path, "
                                             "URL or cloud URI)")
        refused = self._allowed(url, task_id)
        if refused:
            raise AudioFetchError(reference, refused)
        return url

    def fetch(self, reference: str, task_id: int | None = None) -> bytes:
        """Download, following redirects by hand so every hop passes the same checks as the first."""
        url = self.url_for(reference, task_id)
        for _ in range(MAX_REDIRECTS + 1):
            headers = self.auth.header() if self._is_label_studio(url) else {}
            try:
                response = self.session.get(url, headers=headers, stream=True, timeout=(5, 120), allow_redirects=False)
            except requests.RequestException as exc:
                raise AudioFetchError(reference, f"cannot connect ({type(exc).__name__})") from exc
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    refused = self._allowed(url, task_id)
                    if refused:
                        raise AudioFetchError(reference, f"redirect refused: {refused}")
                    continue
                if response.status_code != 200:
                    raise AudioFetchError(reference, f"HTTP {response.status_code}")
                return self._read_limited(response, reference)
        raise AudioFetchError(reference, "too many redirects")

    def _read_limited(self, response: requests.Response, reference: str) -> bytes:
        limit = self.settings.max_audio_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise AudioFetchError(reference, f"larger than MAX_AUDIO_BYTES ({int(declared)} > {limit})")
        chunks, size = [], 0
        for chunk in response.iter_content(1 << 16):
            size += len(chunk)
            if size > limit:
                raise AudioFetchError(reference, f"larger than MAX_AUDIO_BYTES ({limit})")
            chunks.append(chunk)
        return b"".join(chunks)


def is_media_path(url: str, task_id: int | None) -> bool:
    """A Label Studio route that serves task audio and nothing else.

    Dot segments (plain or percent-encoded) are refused outright: a server that normalizes
    ``/data/upload/../../api/…`` would otherwise be asked for an API route with the token.
    """
    parts = urlsplit(url)
    path = unquote(parts.path)
    if not path or "\\" in path or posixpath.normpath(path) != path.rstrip("/"):  # "..", ".", "//"
        return False
    if path.startswith(MEDIA_PREFIXES):
        return not path.startswith("/data/local-files/") or parts.query.startswith("d=")
    match = PRESIGN_PATH.fullmatch(path)
    return match is not None and task_id is not None and int(match.group(1)) == task_id


def load_task_audio(fetcher: AudioFetcher, task_id: int | None, data: dict, key: str):
    """The 16 kHz clip of one task: its ``data[key]`` reference fetched and decoded within the limits.

    Raises :class:`AudioFetchError` or :class:`~ml_backend.audio.AudioDecodeError` naming the task's audio.
    """
    from .audio import decode_audio

    reference = (data or {}).get(key)
    if not isinstance(reference, str) or not reference:
        raise AudioFetchError(f"task {task_id}", f"task data has no {key!r} audio reference")
    raw = fetcher.fetch(reference, task_id)
    return decode_audio(raw, max_seconds=fetcher.settings.max_audio_seconds, name=clip(reference),
                        timeout=fetcher.settings.ffmpeg_timeout)
