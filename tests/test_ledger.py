"""The corrections ledger: idempotent, order-independent folding of Label Studio webhooks.

Every test runs on SQLite (the embedded default) and, marked ``distributed``, on a real PostgreSQL
server started on loopback for the session: the same code, the same results.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from ml_backend.ledger import Ledger

CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
PROJECT = {"id": 7, "label_config": CONFIG}


def result(text: str, language: str = "en") -> list[dict]:
    return [{"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [text]}},
            {"from_name": "language", "to_name": "audio", "type": "choices", "value": {"choices": [language]}}]


def annotation_event(action: str, ann: int, task: int, text: str, updated: str, *, predicted: str,
                     language: str = "en", cancelled: bool = False) -> dict:
    return {"action": action, "project": PROJECT, "task": {"id": task},
            "annotation": {"id": ann, "task": task, "project": 7, "result": result(text, language),
                           "was_cancelled": cancelled, "updated_at": updated,
                           "prediction": {"result": result(predicted), "model_version": "v1", "score": 0.4}}}


def deleted(*ids: int) -> dict:
    return {"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": [{"id": i} for i in ids]}


EVENTS = [
    # 1: accepted unchanged (punctuation and case only): verified, not a correction
    annotation_event("ANNOTATION_CREATED", 1, 11, "please open the dashboard", "2026-11-24T10:00:00Z",
                     predicted="Please open the dashboard."),
    # 2: created as a correction, then updated (replaces)
    annotation_event("ANNOTATION_CREATED", 2, 12, "Zorvex is ready", "2026-11-24T10:00:01Z",
                     predicted="Servex is ready"),
    annotation_event("ANNOTATION_UPDATED", 2, 12, "Zorvex is ready now", "2026-11-24T10:05:00Z",
                     predicted="Servex is ready"),
    # 3: a correction that is later deleted
    annotation_event("ANNOTATION_CREATED", 3, 13, "Quintaro", "2026-11-24T10:00:02Z", predicted="Quintero"),
    deleted(3),
    # 4: only the language changed: a correction
    annotation_event("ANNOTATION_CREATED", 4, 14, "ciao", "2026-11-24T10:00:03Z", predicted="ciao", language="it"),
    # 5: skipped (cancelled)
    annotation_event("ANNOTATION_CREATED", 5, 15, "", "2026-11-24T10:00:04Z", predicted="hello", cancelled=True),
    {"action": "PROJECT_UPDATED", "project": PROJECT},
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.distributed)])
def make_ledger(request, tmp_path):
    """``make_ledger(name)``: a fresh, empty ledger on the engine under test."""
    if request.param == "sqlite":
        return lambda name="l": Ledger(tmp_path / f"{name}.db")
    from servers import fresh_database

    base = request.getfixturevalue("postgres_url")
    return lambda name="l": Ledger(fresh_database(base))


def state(make_ledger, events: list[dict], name: str) -> list[dict]:
    ledger = make_ledger(name)
    for e in events:
        ledger.corrections.record(e)
    return ledger.corrections.snapshot()


def test_ledger_classifies_corrections(make_ledger):
    ledger = make_ledger()
    for e in EVENTS:
        ledger.corrections.record(e)
    rows = {r["id"]: r for r in ledger.corrections.snapshot()}
    assert rows[1]["kind"] == "verified"
    assert rows[2]["kind"] == "correction" and rows[2]["text"] == "Zorvex is ready now"
    assert rows[3]["kind"] == "deleted"
    assert (rows[4]["kind"], rows[4]["language"], rows[4]["predicted_language"]) == ("correction", "it", "en")
    assert rows[5]["kind"] == "cancelled"
    assert ledger.corrections.counts(7) == {"verified": 1, "correction": 2, "deleted": 1, "cancelled": 1}
    assert ledger.jobs.corrections_since_training(7) == 2


def test_replayed_duplicated_and_reordered_events_give_the_same_ledger(make_ledger):
    reference = state(make_ledger, EVENTS, "reference")
    assert state(make_ledger, EVENTS + EVENTS, "replayed") == reference
    assert state(make_ledger, [e for e in EVENTS for _ in range(3)], "duplicated") == reference
    assert state(make_ledger, list(reversed(EVENTS)), "reversed") == reference
    rng = random.Random(0)
    for n in range(20):
        shuffled = EVENTS + rng.sample(EVENTS, k=4)
        rng.shuffle(shuffled)
        assert state(make_ledger, shuffled, f"shuffled{n}") == reference, f"order {n}"


def test_every_order_of_create_update_delete_ends_deleted(make_ledger):
    trio = [EVENTS[1], EVENTS[2], deleted(2)]
    for n, order in enumerate(itertools.permutations(trio)):
        rows = state(make_ledger, list(order), f"perm{n}")
        assert [r["kind"] for r in rows] == ["deleted"], order


def test_replay_does_not_count_twice_and_jobs_coalesce(make_ledger):
    ledger = make_ledger()
    assert [ledger.corrections.record(e).changed for e in EVENTS] == [1, 1, 1, 1, 1, 1, 1, 0]
    assert ledger.corrections.record(EVENTS[2]).changed == 0  # replay
    job, created = ledger.jobs.request(7, "threshold", min_corrections=3)
    assert job is None and not created  # 2 corrections < 3
    job, created = ledger.jobs.request(7, "threshold", min_corrections=2)
    assert created and job.state == "queued"
    again, created_again = ledger.jobs.request(7, "cli")
    assert again.id == job.id and not created_again  # coalesced while queued
    claimed = ledger.jobs.claim(job.id, "host:1")
    assert claimed.state == "running" and claimed.attempts == 1
    assert ledger.jobs.claim(job.id, "host:2") is None  # a duplicate message does not run it twice
    ledger.jobs.finish(job.id, "rejected", reason="no gain")
    assert ledger.jobs.corrections_since_training(7) == 0  # the job covered them
    ledger.corrections.record(annotation_event("ANNOTATION_CREATED", 9, 19, "Blendrix", "2026-11-24T11:00:00Z",
                                   predicted="Blend tricks"))
    assert ledger.jobs.corrections_since_training(7) == 1


def test_dead_worker_job_is_requeued_then_failed(make_ledger):
    ledger = make_ledger()
    job, _ = ledger.jobs.request(3, "cli")
    ledger.jobs.claim(job.id, "host:1")
    assert ledger.jobs.requeue_or_fail(job.id, "worker died", max_attempts=2) == "queued"
    ledger.jobs.claim(job.id, "host:2")
    assert ledger.jobs.requeue_or_fail(job.id, "worker died again", max_attempts=2) == "failed"
    assert ledger.jobs.get(job.id).reason == "worker died again"


@pytest.mark.parametrize("text,predicted,kind", [("Hello, world!", "hello world", "verified"),
                                                 ("Hello world", "Hello word", "correction")])
def test_normalized_comparison(make_ledger, text, predicted, kind):
    ledger = make_ledger()
    ledger.corrections.record(annotation_event("ANNOTATION_CREATED", 1, 1, text, "2026-11-24T10:00:00Z",
                                               predicted=predicted))
    assert ledger.corrections.snapshot()[0]["kind"] == kind


def test_a_failed_job_gives_its_corrections_back(make_ledger):
    ledger = make_ledger()
    for e in EVENTS:
        ledger.corrections.record(e)
    job, _ = ledger.jobs.request(7, "threshold", min_corrections=2)
    ledger.jobs.claim(job.id, "host:1")
    ledger.jobs.finish(job.id, "failed", reason="Label Studio down")
    assert ledger.jobs.corrections_since_training(7) == 2  # not consumed by the failure
    retry, created = ledger.jobs.request(7, "threshold", min_corrections=2)
    assert created and retry.id != job.id


def test_corrections_that_arrive_during_a_job_queue_the_next_one_when_it_ends(tmp_path, settings, monkeypatch,
                                                                             make_ledger):
    """Never leave corrections waiting: their webhooks found a job running and queued nothing."""
    from dataclasses import replace

    from loopscribe import jobs

    queued: list[int] = []
    monkeypatch.setattr(jobs, "enqueue_training_job", queued.append)
    ledger = make_ledger()
    s = replace(settings, home=tmp_path, retrain_min_corrections=2, database_url=ledger.db.url)
    assert Ledger(s.ledger_url).db.url == ledger.db.url
    for e in EVENTS:
        ledger.corrections.record(e)
    job, _ = ledger.jobs.request(7, "threshold", min_corrections=2)
    ledger.jobs.claim(job.id, "host:1")
    for ann, word in ((21, "Blendrix"), (22, "Kavoria")):  # arrive while the job runs: coalesced
        ledger.corrections.record(annotation_event("ANNOTATION_CREATED", ann, ann, word, "2026-11-24T12:00:00Z",
                                                   predicted="something else"))
        assert ledger.jobs.request(7, "threshold", min_corrections=2) == (ledger.jobs.get(job.id), False)
    ledger.jobs.finish(job.id, "promoted", version="v2")
    follow_up = jobs.queue_follow_up(s, ledger, 7)
    assert follow_up is not None and queued == [follow_up] and ledger.jobs.get(follow_up).state == "queued"
    assert jobs.queue_follow_up(s, ledger, 7) is None  # coalesced with the one just queued
