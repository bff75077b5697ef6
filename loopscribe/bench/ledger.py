"""``loopscribe bench ledger``: webhook events per second into the ledger, SQLite against a database server.

Each run folds the same shuffled deliveries into a fresh ledger from N threads: every
annotation is created and then corrected, and every event arrives three times (Label
Studio retries, several backend replicas), out of order. The embedded SQLite ledger is the
peer in the same run; ``--database-url`` adds a server (PostgreSQL), whose database is used
as given, so point it at an empty scratch database. Each row also checks the result:
every annotation once, at its newest text.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

from ml_backend.ledger import Ledger
from ml_backend.settings import Settings


def deliveries(annotations: int, project: int, seed: int = 0) -> list[dict]:
    """Create then correct each annotation (ids unique to ``project``); every event three times, shuffled."""
    def event(ann: int, text: str, updated: str) -> dict:
        result = [{"from_name": "transcription", "to_name": "audio", "type": "textarea", "value": {"text": [text]}}]
        return {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": ann},
                "annotation": {"id": ann, "task": ann, "project": project, "result": result, "updated_at": updated,
                               "prediction": {"result": [{**result[0], "value": {"text": ["model"]}}]}}}

    ids = range(project * 1_000_000 + 1, project * 1_000_000 + annotations + 1)
    events = [event(a, f"first {a}", "2026-11-25T10:00:00Z") for a in ids]
    events += [event(a, f"second {a}", "2026-11-25T11:00:00Z") for a in ids]
    events *= 3
    random.Random(seed).shuffle(events)
    return events


def fold(ledger: Ledger, events: list[dict], threads: int) -> float:
    """Seconds to record ``events`` from ``threads`` threads."""
    def send(i: int) -> None:
        for e in events[i::threads]:
            ledger.corrections.record(e)

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def bench_ledger(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    targets: list[str | None] = [None, args.database_url] if args.database_url else [None]  # None: SQLite
    table = Table(title=f"ledger: {args.annotations} annotations, {6 * args.annotations} webhook deliveries per run")
    for column in ("database", "threads", "events/s", "vs SQLite", "exactly once"):
        table.add_column(column, justify="right" if column != "database" else "left")
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as scratch:
        peer: dict[int, float] = {}
        for url in targets:
            for run, threads in enumerate(args.threads or [1, 4, 16]):
                project = 1000 + run  # a project of its own per run: a server database is reused
                ledger = Ledger(url or Path(scratch) / f"{run}.db")
                events = deliveries(args.annotations, project, seed=run)
                rate = len(events) / fold(ledger, events, threads)
                rows = ledger.corrections.snapshot(project)
                once = len(rows) == args.annotations and all(r["text"] == f"second {r['id']}" for r in rows)
                peer.setdefault(threads, rate)
                table.add_row(ledger.db.dialect, str(threads), f"{rate:,.0f}", f"{rate / peer[threads]:.2f}×",
                              "yes" if once else "NO")
    Console().print(table)
    return 0
