"""The corrections store: Label Studio annotation webhooks folded into one row per annotation.

Recording is idempotent and order-independent, so Label Studio's at-least-once,
unordered delivery ends in the right state:

* an event older than the row it would replace (by the annotation's ``updated_at``) is ignored,
  so a replayed or late ``ANNOTATION_CREATED`` never undoes an ``ANNOTATION_UPDATED``;
* a delete leaves a tombstone (annotation ids are never reused), so a create that
  arrives after its delete stays deleted;
* a replay with the same content changes nothing.

Events reach it validated (:mod:`ml_backend.payloads`); every content change takes the next
value of the database's sequence, which is how training jobs say which corrections they cover.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .annotations import classify, extract
from .database import Database
from .label_config import LabelConfigError, TranscriptionConfig, parse_label_config
from .payloads import ANNOTATION_ACTIONS, DELETE_ACTION

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,          -- Label Studio annotation id
    project INTEGER NOT NULL,
    task INTEGER,
    updated_at REAL NOT NULL,        -- the annotation's own updated_at (orders events)
    kind TEXT NOT NULL,              -- correction | verified | cancelled | deleted
    text TEXT, language TEXT, predicted_text TEXT, predicted_language TEXT,
    model_version TEXT,              -- of the prediction it started from
    changed_seq INTEGER NOT NULL     -- sequence of the last content change
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations(project, kind, changed_seq);
"""
CONTENT = ("kind", "text", "language", "predicted_text", "predicted_language", "model_version")


def _timestamp(value: Any) -> float:
    """Label Studio's ISO ``updated_at`` (or epoch seconds) as epoch seconds; 0 when missing."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    return 0.0


@dataclass(frozen=True)
class Recorded:
    """What one webhook did to the store."""

    action: str
    project: int | None
    changed: int  # annotation rows whose state changed (0 for a replay)


class CorrectionsStore:
    def __init__(self, database: Database):
        self.db = database

    def record(self, event: dict) -> Recorded:
        """Fold one validated webhook event in. Events other than annotation changes are ignored."""
        action = str(event.get("action"))
        project = (event.get("project") or {}).get("id") if isinstance(event.get("project"), dict) else None
        if action in ANNOTATION_ACTIONS and isinstance(event.get("annotation"), dict):
            return Recorded(action, project, self._upsert(event["annotation"], event))
        if action == DELETE_ACTION:
            ids = [a.get("id") for a in event.get("annotations") or [] if isinstance(a, dict)]
            return Recorded(action, project, self._delete([int(i) for i in ids if i is not None], project))
        return Recorded(action, project, 0)

    @staticmethod
    def _classify(annotation: dict, event: dict) -> dict:
        config: TranscriptionConfig | None = None
        label_config = (event.get("project") or {}).get("label_config")
        if label_config:
            try:
                config = parse_label_config(label_config)
            except LabelConfigError:
                config = None
        prediction = annotation.get("prediction") or {}
        human = extract(annotation.get("result"), config)
        predicted = extract(prediction.get("result"), config) if prediction.get("result") else None
        kind = "cancelled" if annotation.get("was_cancelled") else classify(human, predicted)
        return {
            "kind": kind, "text": human.text, "language": human.language,
            "predicted_text": predicted.text if predicted else None,
            "predicted_language": predicted.language if predicted else None,
            "model_version": prediction.get("model_version"),
        }

    def _upsert(self, annotation: dict, event: dict) -> int:
        ann_id = int(annotation["id"])
        task = annotation.get("task")
        task = task.get("id") if isinstance(task, dict) else task
        if task is None and isinstance(event.get("task"), dict):
            task = event["task"].get("id")
        project = annotation.get("project") or (event.get("project") or {}).get("id")
        updated = _timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        row = self._classify(annotation, event)
        with self.db.transaction() as db:
            old = db.execute("SELECT * FROM annotations WHERE id = ?", (ann_id,)).fetchone()
            if old is not None and (old["kind"] == "deleted" or old["updated_at"] > updated):
                return 0  # deleted for good, or a stale (out-of-order) event
            if old is not None and all(old[f] == row[f] for f in CONTENT):
                if old["updated_at"] != updated:
                    db.execute("UPDATE annotations SET updated_at = ? WHERE id = ?", (updated, ann_id))
                return 0  # a replay, or a save that changed nothing
            seq = Database.next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO annotations(id, project, task, updated_at, kind, text, language,"
                " predicted_text, predicted_language, model_version, changed_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ann_id, project, task, updated, *(row[f] for f in CONTENT), seq),
            )
            return 1

    def _delete(self, ids: list[int], project: int | None) -> int:
        changed = 0
        with self.db.transaction() as db:
            for ann_id in ids:
                old = db.execute("SELECT kind FROM annotations WHERE id = ?", (ann_id,)).fetchone()
                if old is not None and old["kind"] == "deleted":
                    continue
                seq = Database.next_seq(db)
                if old is None:
                    db.execute("INSERT INTO annotations(id, project, updated_at, kind, changed_seq)"
                               " VALUES (?, ?, ?, 'deleted', ?)", (ann_id, project or 0, float("inf"), seq))
                else:
                    db.execute("UPDATE annotations SET kind = 'deleted', updated_at = ?, changed_seq = ?, task = NULL,"
                               " text = NULL, language = NULL, predicted_text = NULL, predicted_language = NULL,"
                               " model_version = NULL WHERE id = ?", (float("inf"), seq, ann_id))
                changed += 1
        return changed

    def snapshot(self, project: int | None = None) -> list[dict]:
        """The annotation state (without bookkeeping columns): what idempotency is judged on."""
        query = ("SELECT id, project, task, kind, text, language, predicted_text, predicted_language, model_version"
                 " FROM annotations WHERE (? IS NULL OR project = ?) ORDER BY id")
        with self.db.connect() as db:
            return [dict(r) for r in db.execute(query, (project, project))]

    def counts(self, project: int) -> dict[str, int]:
        with self.db.connect() as db:
            rows = db.execute("SELECT kind, COUNT(*) FROM annotations WHERE project = ? GROUP BY kind", (project,))
            return {kind: n for kind, n in rows}

    @staticmethod
    def count_since(db: sqlite3.Connection, project: int, seq: int) -> int:
        """Corrections of ``project`` changed after sequence ``seq`` (inside the caller's connection)."""
        return int(db.execute("SELECT COUNT(*) FROM annotations WHERE project = ? AND kind = 'correction'"
                              " AND changed_seq > ?", (project, seq)).fetchone()[0])

    def projects(self) -> list[int]:
        with self.db.connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM annotations WHERE project > 0")]
