"""Which Label Studio projects exist: webhooks for any other project are ignored, not recorded.

A webhook names its project; anyone holding the webhook secret (or a replayed audit log)
could name a project Label Studio never had and fill the ledger or queue training for it.
The backend asks Label Studio once (``GET /api/projects/<id>/`` with its own token) and
remembers the answer. Only a clear 404 counts as "does not exist": when Label Studio is
down or refuses the token, the event is recorded (losing a real correction is worse) and
the answer is asked again next time.

The same answer says how many tasks the project has, which sets how many held-out tasks
``/next`` serves first (:func:`ml_backend.splits.ahead_share`).
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
        self._known: dict[int, tuple[ProjectState, int | None, float]] = {}
        self._lock = threading.Lock()

    def state(self, project: int) -> ProjectState:
        return self._lookup(project)[0]

    def size(self, project: int) -> int | None:
        """The project's task count as Label Studio last said (within ``EXISTS_TTL_S``); None when unknown."""
        return self._lookup(project)[1]

    def _lookup(self, project: int) -> tuple[ProjectState, int | None]:
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(project)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        state, size = self._ask(project)
        if state is not ProjectState.UNKNOWN:
            ttl = EXISTS_TTL_S if state is ProjectState.EXISTS else MISSING_TTL_S
            with self._lock:
                if len(self._known) > 10_000:  # bounded: ids are client-chosen
                    self._known.clear()
                self._known[project] = (state, size, now + ttl)
        return state, size

    def _ask(self, project: int) -> tuple[ProjectState, int | None]:
        try:
            response = self.session.get(f"{self.auth.base_url}/api/projects/{project}/", headers=self.auth.header(),
                                        timeout=TIMEOUT_S, allow_redirects=False)
        except (requests.RequestException, AudioFetchError) as exc:
            log.warning("cannot ask Label Studio whether project %d exists (%s); recording the event",
                        project, type(exc).__name__)
            return ProjectState.UNKNOWN, None
        if response.status_code == 200:
            return ProjectState.EXISTS, _task_number(response)
        if response.status_code == 404:
            return ProjectState.MISSING, None
        log.warning("Label Studio answered HTTP %d for project %d; recording the event", response.status_code, project)
        return ProjectState.UNKNOWN, None


def _task_number(response: requests.Response) -> int | None:
    try:
        value = response.json().get("task_number")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None
