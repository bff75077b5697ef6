"""The frozen held-out split: the first split a task is given is its split for good."""

from __future__ import annotations

from .database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS splits (
    project INTEGER NOT NULL, task INTEGER NOT NULL, split TEXT NOT NULL,
    PRIMARY KEY (project, task)
);
"""


class SplitStore:
    def __init__(self, database: Database):
        self.db = database

    def freeze(self, project: int, assignments: dict[int, str]) -> dict[int, str]:
        """Record first-seen splits; a task keeps the split it was first given. Returns all of the project's."""
        with self.db.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO splits(project, task, split) VALUES (?, ?, ?)",
                           [(project, t, s) for t, s in assignments.items()])
            rows = db.execute("SELECT task, split FROM splits WHERE project = ?", (project,))
            return {task: split for task, split in rows}
