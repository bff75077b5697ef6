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

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from .annotations import classify, extract
from .database import Database
from .label_config import LabelConfigError, TranscriptionConfig, parse_label_config
from .payloads import ANNOTATION_ACTIONS, DELETE_ACTION
from .schema import annotations_table

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
        this = annotations_table.c.id == ann_id
        with self.db.transaction() as db:
            old = db.execute(select(annotations_table).where(this)).mappings().first()
            if old is not None and (old["kind"] == "deleted" or old["updated_at"] > updated):
                return 0  # deleted for good, or a stale (out-of-order) event
            if old is not None and all(old[f] == row[f] for f in CONTENT):
                if old["updated_at"] != updated:
                    db.execute(update(annotations_table).where(this).values(updated_at=updated))
                return 0  # a replay, or a save that changed nothing
            values = row | {"project": project, "task": task, "updated_at": updated,
                            "changed_seq": Database.next_seq(db)}
            if old is None:
                db.execute(insert(annotations_table).values(id=ann_id, **values))
            else:
                db.execute(update(annotations_table).where(this).values(**values))
            return 1

    def _delete(self, ids: list[int], project: int | None) -> int:
        changed = 0
        with self.db.transaction() as db:
            for ann_id in ids:
                this = annotations_table.c.id == ann_id
                kind = db.execute(select(annotations_table.c.kind).where(this)).scalar()
                if kind == "deleted":
                    continue
                tombstone = {"kind": "deleted", "updated_at": float("inf"), "changed_seq": Database.next_seq(db)}
                if kind is None:
                    db.execute(insert(annotations_table).values(id=ann_id, project=project or 0, **tombstone))
                else:
                    db.execute(update(annotations_table).where(this).values(
                        task=None, **{f: None for f in CONTENT if f != "kind"}, **tombstone))
                changed += 1
        return changed

    def snapshot(self, project: int | None = None) -> list[dict]:
        """The annotation state (without bookkeeping columns): what idempotency is judged on."""
        c = annotations_table.c
        query = select(c.id, c.project, c.task, *(c[f] for f in CONTENT)).order_by(c.id)
        if project is not None:
            query = query.where(c.project == project)
        with self.db.connect() as db:
            return [dict(r) for r in db.execute(query).mappings()]

    def counts(self, project: int) -> dict[str, int]:
        c = annotations_table.c
        with self.db.connect() as db:
            rows = db.execute(select(c.kind, func.count()).where(c.project == project).group_by(c.kind))
            return {kind: n for kind, n in rows}

    @staticmethod
    def count_since(db: Connection, project: int, seq: int) -> int:
        """Corrections of ``project`` changed after sequence ``seq`` (inside the caller's connection)."""
        c = annotations_table.c
        return int(db.execute(select(func.count()).where(c.project == project, c.kind == "correction",
                                                         c.changed_seq > seq)).scalar() or 0)

    def projects(self) -> list[int]:
        with self.db.connect() as db:
            c = annotations_table.c
            return list(db.execute(select(c.project).distinct().where(c.project > 0)).scalars())
