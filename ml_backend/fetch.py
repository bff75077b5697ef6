"""Fetch task audio the way Label Studio stores it, from allowed hosts only, within size limits.

Task data holds one of: an upload (``/data/upload/…``), a local file
(``/data/local-files/?d=…``), an absolute http(s) URL, or a cloud URI (``s3://``,
``gs://``, ``azure-blob://``) that Label Studio presigns. Label Studio paths need the
backend's own token: a legacy token is sent as ``Token``; a personal access token (a
JWT refresh token) is exchanged for a 5-minute access token sent as ``Bearer``.
"""

from __future__ import annotations

import base64
import threading
import time
from urllib.parse import urljoin, urlsplit

import requests

from .settings import Settings

CLOUD_SCHEMES = {"s3", "gs", "gcs", "azure-blob", "azure"}
MAX_REDIRECTS = 5
ACCESS_TOKEN_SECONDS = 240  # Label Studio access tokens live 5 minutes


class AudioFetchError(ValueError):
    """Task audio that cannot be fetched: bad reference, host not allowed, HTTP error, too large."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


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
                    raise AudioFetchError("label studio", f"personal access token refresh failed (HTTP {r.status_code})")
                self._access = (r.json()["access"], time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}


class AudioFetcher:
    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self.session = session or requests.Session()
        self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key, self.session)
        self.ls_host = urlsplit(settings.label_studio_url).netloc.lower()
        self.allowed = {self.ls_host} | {h.lower() for h in settings.allowed_audio_hosts}

    def _host_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and (parts.netloc.lower() in self.allowed or
                                                      (parts.hostname or "").lower() in self.allowed)

    def url_for(self, reference: str, task_id: int | None = None) -> tuple[str, bool]:
        """The URL to download and whether it may follow redirects anywhere (only presigned ones)."""
        scheme = urlsplit(reference).scheme.lower()
        if reference.startswith("/"):
            return f"{self.settings.label_studio_url}{reference}", False
        if scheme in ("http", "https"):
            if not self._host_allowed(reference):
                raise AudioFetchError(reference, f"host {urlsplit(reference).netloc!r} is not in ALLOWED_AUDIO_HOSTS")
            return reference, False
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise AudioFetchError(reference, "cloud URI without a task id cannot be presigned")
            encoded = base64.urlsafe_b64encode(reference.encode()).decode()
            return f"{self.settings.label_studio_url}/tasks/{task_id}/presign/?fileuri={encoded}", True
        raise AudioFetchError(reference, "unsupported audio reference (expected a Label Studio path, URL or cloud URI)")

    def fetch(self, reference: str, task_id: int | None = None) -> bytes:
        """Download, following redirects by hand so every hop is checked (presigned targets excepted)."""
        url, trust_redirects = self.url_for(reference, task_id)
        for _ in range(MAX_REDIRECTS + 1):
            same_host = urlsplit(url).netloc.lower() == self.ls_host
            headers = self.auth.header() if same_host else {}
            try:
                response = self.session.get(url, headers=headers, stream=True, timeout=(5, 120), allow_redirects=False)
            except requests.RequestException as exc:
                raise AudioFetchError(reference, f"cannot connect ({type(exc).__name__})") from exc
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers["Location"])
                    if not trust_redirects and not self._host_allowed(url):
                        raise AudioFetchError(reference, f"redirect to a host not allowed ({urlsplit(url).netloc})")
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


def load_task_audio(fetcher: AudioFetcher, task_id: int | None, data: dict, key: str):
    """The 16 kHz clip of one task: its ``data[key]`` reference fetched and decoded within the limits.

    Raises :class:`AudioFetchError` or :class:`~ml_backend.audio.AudioDecodeError` naming the task's audio.
    """
    from .audio import decode_audio

    reference = (data or {}).get(key)
    if not isinstance(reference, str) or not reference:
        raise AudioFetchError(f"task {task_id}", f"task data has no {key!r} audio reference")
    raw = fetcher.fetch(reference, task_id)
    return decode_audio(raw, max_seconds=fetcher.settings.max_audio_seconds, name=reference)
