"""The backend's view of Label Studio projects: whether one exists, its size, its task ids (a loopback stand-in)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from conftest import QuietHandler

from ml_backend import projects as projects_module
from ml_backend.fetch import LabelStudioAuth
from ml_backend.projects import ProjectDirectory
from ml_backend.splits import ahead_cutoff, serving_score

TOKEN = "legacy-token-123"


class FakeLabelStudio(QuietHandler):
    """``/api/projects/<id>/`` and the paged ``/api/tasks/`` of one project; counts the task listings."""

    project, task_ids, listings, answer = 3, list(range(500, 740)), 0, 200

    def do_GET(self):
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401, b"{}")
        url = urlparse(self.path)
        if url.path == f"/api/projects/{self.project}/":
            return self._send(200, json.dumps({"id": self.project, "task_number": len(self.task_ids)}).encode())
        if url.path == "/api/tasks/":
            cls = type(self)
            cls.listings += 1
            if self.answer != 200:
                return self._send(self.answer, b"{}")
            query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
            assert query["project"] == self.project
            size, page = query["page_size"], query["page"]
            tasks = [{"id": t, "data": {}} for t in self.task_ids[(page - 1) * size:page * size]]
            return self._send(200, json.dumps({"tasks": tasks, "total": len(self.task_ids)}).encode())
        return self._send(404, b"{}")


@pytest.fixture
def label_studio(monkeypatch) -> Iterator[str]:
    monkeypatch.setattr(FakeLabelStudio, "task_ids", list(range(500, 740)))
    monkeypatch.setattr(FakeLabelStudio, "listings", 0)
    monkeypatch.setattr(FakeLabelStudio, "answer", 200)
    monkeypatch.setattr(projects_module, "LIST_PAGE", 100)  # three pages for 240 tasks
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_task_ids_are_listed_once_per_project_size(label_studio, monkeypatch):
    monkeypatch.setattr(projects_module, "EXISTS_TTL_S", 0.0)  # the size is asked every time
    directory = ProjectDirectory(LabelStudioAuth(label_studio, TOKEN))
    assert directory.task_ids(3) == list(range(500, 740))  # every page
    assert directory.task_ids(3) == list(range(500, 740)) and FakeLabelStudio.listings == 3  # same size: cached
    # tasks imported: a new size, so the ids are listed again
    monkeypatch.setattr(FakeLabelStudio, "task_ids", list(range(500, 760)))
    assert directory.task_ids(3) == list(range(500, 760)) and FakeLabelStudio.listings == 6


def test_the_backend_serves_exactly_the_count_ahead_like_loopscribe_predict(label_studio):
    """The backend's cutoff (task ids from Label Studio's API) is the one ``loopscribe predict`` computes."""
    directory = ProjectDirectory(LabelStudioAuth(label_studio, TOKEN))
    ids = FakeLabelStudio.task_ids
    cutoff = ahead_cutoff(3, directory.size(3), lambda: directory.task_ids(3), 0.2, 0.05, 30)
    assert cutoff == ahead_cutoff(3, len(ids), lambda: ids, 0.2, 0.05, 30)
    assert sum(serving_score(0.5, 3, t, 0.2, cutoff) < 0.001 for t in ids) == 30


def test_label_studio_down_or_refusing_leaves_the_share(label_studio, caplog):
    FakeLabelStudio.answer = 500
    directory = ProjectDirectory(LabelStudioAuth(label_studio, TOKEN))
    assert directory.task_ids(3) is None
    assert "HTTP 500" in caplog.text and TOKEN not in caplog.text
    assert ahead_cutoff(3, 240, lambda: directory.task_ids(3), 0.2, 0.05, 30) == pytest.approx(30 / 240)
    FakeLabelStudio.answer = 200  # not cached: asked again next time
    assert directory.task_ids(3) == list(range(500, 740))
    nobody = ProjectDirectory(LabelStudioAuth("http://127.0.0.1:9", TOKEN))  # nothing listens
    assert nobody.task_ids(3) is None


def test_a_listing_in_flight_is_not_started_again(label_studio, monkeypatch):
    """With "retrieve predictions automatically" on, listing tasks makes Label Studio call the backend's predict,
    which would list again: that inner call gets None (the share) instead."""
    directory = ProjectDirectory(LabelStudioAuth(label_studio, TOKEN))
    inner: list[list[int] | None] = []
    page = directory._page

    def page_calling_back(project: int, number: int):
        if not inner:
            inner.append(directory.task_ids(project))
        return page(project, number)

    monkeypatch.setattr(directory, "_page", page_calling_back)
    assert directory.task_ids(3) == list(range(500, 740))
    assert inner == [None]
