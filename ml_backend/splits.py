"""The held-out split: which tasks are held out (a hash), the frozen record of it, and the order they are served in.

A task is held out when a hash of project and task id falls below ``HELDOUT_FRACTION``:
stateless, so the backend can tell at prediction time, and the same on every machine. The
first split a task is given is frozen in the ledger for good.

Label Studio's uncertainty sampling serves tasks by ascending prediction score. If held-out
tasks were ranked like the others, the annotated part of the held-out split would be the
hardest clips, and the gate would judge candidates on them alone. So the score is a serving
key in three bands inside [0, 1], the range Label Studio accepts (:func:`serving_score`):

* ``[0, 0.0009]``: the *ahead* tasks, held-out tasks whose hash is below ``HELDOUT_AHEAD``, or
  the ``HELDOUT_AHEAD_TASKS`` held-out tasks of lowest hash when that is more (:func:`ahead_cutoff`):
  served first, so the gate has a random sample of the project from its first job on;
* ``[0.001, 0.999]``: the training pool, ranked by confidence (least sure first);
* ``[0.9991, 1]``: the rest of the held-out split, served after the pool.

:func:`confidence_of` turns a score back into the model's confidence.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable

from sqlalchemy import insert, select

from .database import Database
from .schema import splits_table

HELDOUT, TRAIN = "heldout", "train"
# (offset, width) of each band of the serving score; confidences in [0, 1] are squeezed into them
AHEAD_BAND, POOL_BAND, LATER_BAND = (0.0, 0.0009), (0.001, 0.998), (0.9991, 0.0009)
POSITIONS = 10_000  # a hash position is a multiple of 1 / POSITIONS


def split_position(project: int, task: int) -> float:
    """A task's place in [0, 1) by a hash of project and task id: uniform, and the same everywhere."""
    digest = int(hashlib.sha256(f"{project}:{task}".encode()).hexdigest()[:8], 16)
    return (digest % POSITIONS) / POSITIONS


def heldout_by_hash(project: int, task: int, fraction: float) -> bool:
    """Deterministic, stable assignment: the same task always lands on the same side."""
    return split_position(project, task) < fraction


def ahead_share(heldout_fraction: float, heldout_ahead: float, heldout_ahead_tasks: int,
                project_tasks: int | None) -> float:
    """Share of the project (of hash positions) served ahead: ``heldout_ahead``, raised so that about
    ``heldout_ahead_tasks`` tasks are when the project's size is known, never more than the held-out split.

    5 % of a 150-task project is 7 tasks: too few for the gate to see a real improvement, so it
    kept missing them (speechocean762 benchmark). The count floor gives small projects a sample
    the gate can decide on; large ones keep the share. A share of hash positions is a count only on
    average (Binomial: 20 to 37 tasks for 30 in the benchmark's 240-task projects), so where the
    project's task ids are known :func:`ahead_cutoff` makes the count exact.
    """
    share = heldout_ahead
    if project_tasks:
        share = max(share, heldout_ahead_tasks / project_tasks)
    return min(share, heldout_fraction)


def ahead_cutoff(project: int, project_tasks: int | None, task_ids: Callable[[], Iterable[int] | None],
                 heldout_fraction: float, heldout_ahead: float, heldout_ahead_tasks: int) -> float:
    """Hash position below which held-out tasks are served ahead: :func:`ahead_share`, except that where
    the count decides (a project smaller than ``heldout_ahead_tasks / heldout_ahead``) it is set just
    above the ``heldout_ahead_tasks``-th lowest held-out position among ``task_ids()``, so exactly that
    many are ahead (more only on a tie of positions, one in ``POSITIONS``).

    ``task_ids`` is called only then, so a large project is never listed; when it returns None (Label
    Studio did not answer) the share stands. Tasks imported later can move the cutoff: a task ahead
    until then may drop to the rest of the held-out split when it is next scored.
    """
    share = ahead_share(heldout_fraction, heldout_ahead, heldout_ahead_tasks, project_tasks)
    if share <= heldout_ahead:  # the share decides
        return share
    ids = task_ids()
    if ids is None:
        return share
    held_out = (p for p in (split_position(project, t) for t in set(ids)) if p < heldout_fraction)
    lowest = heapq.nsmallest(heldout_ahead_tasks, held_out)
    if len(lowest) < heldout_ahead_tasks:  # a held-out split smaller than the count: all of it
        return heldout_fraction
    between = (round(lowest[-1] * POSITIONS) + 0.5) / POSITIONS  # halfway to the next position: no float tie
    return min(max(heldout_ahead, between), heldout_fraction)


def serving_score(confidence: float, project: int | None, task: int | None, heldout_fraction: float,
                  ahead: float) -> float:
    """The prediction score Label Studio ranks by (lowest first): see the module's bands. ``ahead`` is
    the :func:`ahead_share` of the task's project."""
    band = POOL_BAND
    if project is not None and task is not None:
        position = split_position(project, task)
        if position < min(ahead, heldout_fraction):
            band = AHEAD_BAND
        elif position < heldout_fraction:
            band = LATER_BAND
    offset, width = band
    return offset + width * min(max(confidence, 0.0), 1.0)


def confidence_of(score: float) -> float:
    """The model's confidence behind a :func:`serving_score`."""
    for offset, width in (AHEAD_BAND, LATER_BAND, POOL_BAND):
        if offset <= score <= offset + width:
            return (score - offset) / width
    return score


class SplitStore:
    def __init__(self, database: Database):
        self.db = database

    def freeze(self, project: int, assignments: dict[int, str]) -> dict[int, str]:
        """Record first-seen splits; a task keeps the split it was first given. Returns all of the project's."""
        query = select(splits_table.c.task, splits_table.c.split).where(splits_table.c.project == project)
        with self.db.transaction() as db:
            frozen: dict[int, str] = {task: split for task, split in db.execute(query)}
            new = {t: s for t, s in assignments.items() if t not in frozen}
            if new:
                db.execute(insert(splits_table), [{"project": project, "task": t, "split": s} for t, s in new.items()])
            return frozen | new
