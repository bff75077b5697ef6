"""Which Label Studio projects exist: webhooks for any other project are ignored, not recorded.

A webhook names its project; anyone holding the webhook secret (or a replayed audit log)
could name a project Label Studio never had and fill the ledger or queue training for it.
The backend asks Label Studio once (``GET /api/projects/<id>/`` with its own token) and
remembers the answer. Only a clear 404 counts as "does not exist": when Label Studio is
down or refuses the token, the event is recorded (losing a real correction is worse) and
the answer is asked again next time.

The same answer says how many tasks the project has, which sets how many held-out tasks
``/next`` serves first; where that is a count, not a share, the project's task ids decide which
(:func:`ml_backend.splits.ahead_cutoff`), listed once per size of the project.
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
LIST_TIMEOUT_S = 5.0  # a page of task ids, asked while predicting, not in a webhook
LIST_PAGE, LIST_PAGES = 1000, 100


class ProjectState(Enum):
    EXISTS = "exists"
    MISSING = "missing"
    UNKNOWN = "unknown"  # Label Studio could not say


class ProjectDirectory:
    def __init__(self, auth: LabelStudioAuth, session: requests.Session | None = None):
        self.auth = auth
        self.session = session or requests.Session()
        self._known: dict[int, tuple[ProjectState, int | None, float]] = {}
        self._task_ids: dict[int, tuple[int | None, list[int]]] = {}  # project → (its size then, its ids)
        self._listing: set[int] = set()
        self._lock = threading.Lock()

    def state(self, project: int) -> ProjectState:
        return self._lookup(project)[0]

    def size(self, project: int) -> int | None:
        """The project's task count as Label Studio last said (within ``EXISTS_TTL_S``); None when unknown."""
        return self._lookup(project)[1]

    def task_ids(self, project: int) -> list[int] | None:
        """Every task id of ``project``, listed again when its :meth:`size` changes; None when Label Studio
        does not answer, or while another request is listing the project.

        That second case matters: with "retrieve predictions automatically" on, Label Studio asks this
        backend for the predictions of listed tasks that lack one, and that request must not list again.
        """
        size = self.size(project)
        with self._lock:
            cached = self._task_ids.get(project)
            if cached is not None and cached[0] == size:
                return cached[1]
            if project in self._listing:
                return None
            self._listing.add(project)
        try:
            ids = self._list(project)
        finally:
            with self._lock:
                self._listing.discard(project)
        if ids is not None:
            with self._lock:
                if len(self._task_ids) > 1_000:  # bounded, like the states
                    self._task_ids.clear()
                self._task_ids[project] = (size, ids)
        return ids

    def _list(self, project: int) -> list[int] | None:
        ids: list[int] = []
        try:
            for page in range(1, LIST_PAGES + 1):
                tasks, total = self._page(project, page)
                ids += tasks
                if not tasks or len(ids) >= total:
                    break
        except (requests.RequestException, AudioFetchError, ValueError, TypeError, KeyError) as exc:
            log.warning("cannot list the tasks of project %d (%s); the held-out share stands", project, exc)
            return None
        return ids

    def _page(self, project: int, page: int) -> tuple[list[int], int]:
        """One page of the project's task ids, and how many tasks it has in all."""
        try:
            response = self.session.get(f"{self.auth.base_url}/api/tasks/", headers=self.auth.header(),
                                        params={"project": project, "page": page, "page_size": LIST_PAGE},
                                        timeout=LIST_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            raise requests.RequestException(type(exc).__name__) from None  # its message may hold the URL
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        try:
            body = response.json()
            return [int(t["id"]) for t in body["tasks"]], int(body["total"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a task list ({type(exc).__name__})") from None

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
