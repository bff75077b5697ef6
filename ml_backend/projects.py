"""Which Label Studio projects exist: webhooks for any other project are ignored, not recorded.

A webhook names its project; anyone holding the webhook secret (or a replayed audit log)
could name a project Label Studio never had and fill the ledger or queue training for it.
The backend asks Label Studio once (``GET /api/projects/<id>/`` with its own token) and
remembers the answer. Only a clear 404 counts as "does not exist": when Label Studio is
down or refuses the token, the event is recorded (losing a real correction is worse) and
the answer is asked again next time.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum

import requests

from .fetch import AudioFetchError, LabelStudioAuth

log = logging.getLogger(__name__)

EXISTS_TTL_S = 600.0
MISSING_TTL_S = 30.0
TIMEOUT_S = 0.5  # Label Studio waits one second for the whole webhook


class ProjectState(Enum):
    EXISTS = "exists"
    MISSING = "missing"
    UNKNOWN = "unknown"  # Label Studio could not say


class ProjectDirectory:
    def __init__(self, auth: LabelStudioAuth, session: requests.Session | None = None):
        self.auth = auth
        self.session = session or requests.Session()
        self._known: dict[int, tuple[ProjectState, float]] = {}
        self._lock = threading.Lock()

    def state(self, project: int) -> ProjectState:
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(project)
        if cached is not None and cached[1] > now:
            return cached[0]
        state = self._ask(project)
        if state is not ProjectState.UNKNOWN:
            ttl = EXISTS_TTL_S if state is ProjectState.EXISTS else MISSING_TTL_S
            with self._lock:
                if len(self._known) > 10_000:  # bounded: ids are client-chosen
                    self._known.clear()
                self._known[project] = (state, now + ttl)
        return state

    def _ask(self, project: int) -> ProjectState:
        try:
            response = self.session.get(f"{self.auth.base_url}/api/projects/{project}/", headers=self.auth.header(),
                                        timeout=TIMEOUT_S, allow_redirects=False)
        except (requests.RequestException, AudioFetchError) as exc:
            log.warning("cannot ask Label Studio whether project %d exists (%s); recording the event",
                        project, type(exc).__name__)
            return ProjectState.UNKNOWN
        if response.status_code == 200:
            return ProjectState.EXISTS
        if response.status_code == 404:
            return ProjectState.MISSING
        log.warning("Label Studio answered HTTP %d for project %d; recording the event", response.status_code, project)
        return ProjectState.UNKNOWN
