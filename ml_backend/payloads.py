"""What the backend accepts from Label Studio, validated (pydantic) before anything is read or written.

Every route parses its body through one of these models; a payload that does not fit is
answered ``400`` with the first problems named, and nothing reaches the ledger, the audit
log or the model. Unknown extra fields are kept (Label Studio adds fields between versions),
but every field Loopscribe reads has a checked type: ids are integers, results are lists of
objects, region times are finite numbers, timestamps are dates not far in the future.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import LoopscribeError

WEBHOOK_SECRET_HEADER = "X-Loopscribe-Secret"  # carries WEBHOOK_SECRET; Label Studio sends it on our webhook
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
DELETE_ACTION = "ANNOTATIONS_DELETED"
TRAIN_ACTION = "START_TRAINING"
# Label Studio's webhook actions: anything else is counted as "other" in /metrics (bounded label set).
KNOWN_ACTIONS = frozenset({
    *ANNOTATION_ACTIONS, DELETE_ACTION, TRAIN_ACTION, "ANNOTATIONS_CREATED", "PROJECT_CREATED",
    "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED", "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
})
MAX_ID = 2**63 - 1

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class PayloadError(LoopscribeError, ValueError):
    """A request body that does not fit its schema; the message names what is wrong (no values echoed)."""


def describe(exc: ValidationError, limit: int = 5) -> str:
    """The first few validation problems as ``location: message`` (input values left out: they may be huge)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


class _Open(BaseModel):
    """Unknown fields are kept as they came; known ones are typed."""

    model_config = ConfigDict(extra="allow")


class ResultValue(_Open):
    text: list[StrictStr] | StrictStr | None = None
    choices: list[StrictStr] | None = None
    labels: list[StrictStr] | None = None
    start: float | None = None
    end: float | None = None

    @field_validator("start", "end")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value


class ResultItem(_Open):
    type: StrictStr | None = None
    from_name: StrictStr | None = None
    to_name: StrictStr | None = None
    value: ResultValue = Field(default_factory=ResultValue)


class Prediction(_Open):
    result: list[ResultItem] | None = None
    model_version: StrictStr | None = None
    score: float | None = None


class ProjectRef(_Open):
    id: Id
    label_config: StrictStr | None = None


class TaskRef(_Open):
    id: Id
    data: dict[str, Any] | None = None


def _as_utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # Label Studio writes UTC
    return value


class Annotation(_Open):
    id: Id
    result: list[ResultItem] = Field(default_factory=list)
    was_cancelled: bool = False
    prediction: Prediction | None = None
    task: Id | TaskRef | None = None
    project: Id | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    _utc = field_validator("created_at", "updated_at")(_as_utc)


class DeletedAnnotation(_Open):
    id: Id


class WebhookEvent(_Open):
    """A Label Studio webhook. Annotation, delete and training events must name their project."""

    action: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    project: ProjectRef | None = None
    annotation: Annotation | None = None
    annotations: list[DeletedAnnotation] | None = None
    task: TaskRef | None = None

    @model_validator(mode="after")
    def _required_for_action(self) -> WebhookEvent:
        if self.action in ANNOTATION_ACTIONS | {DELETE_ACTION, TRAIN_ACTION} and self.project is None:
            raise ValueError(f"{self.action} needs a project object with an integer id")
        if self.action in ANNOTATION_ACTIONS and self.annotation is None:
            raise ValueError(f"{self.action} needs an annotation object")
        if self.action == DELETE_ACTION and self.annotations is None:
            raise ValueError(f"{DELETE_ACTION} needs a list of annotations")
        return self

    @property
    def metric_action(self) -> str:
        return self.action if self.action in KNOWN_ACTIONS else "other"

    def check_clock(self, now: datetime, max_future_seconds: float) -> None:
        """Refuse timestamps far in the future: the ledger orders events by them, so one would freeze a row."""
        if self.annotation is None:
            return
        for name in ("updated_at", "created_at"):
            value = getattr(self.annotation, name)
            if value is not None and (value - now).total_seconds() > max_future_seconds:
                raise PayloadError(f"annotation.{name} lies more than {max_future_seconds:g} s in the future")

    def to_ledger(self) -> dict:
        """The event as the ledger reads it: validated, types normalized, timestamps as ISO strings."""
        return self.model_dump(mode="json", exclude_none=True)


def project_number(value: str | int | None) -> int | None:
    """Label Studio names the project ``"<id>.<created timestamp>"`` in /setup and /predict; ids elsewhere."""
    if value is None or isinstance(value, int):
        return value
    head = value.split(".", 1)[0]
    if not head.isdigit() or len(head) > 18:
        raise PayloadError(f"project: expected '<id>.<timestamp>' or an id, got {len(value)} characters")
    return int(head)


class SetupRequest(_Open):
    project: StrictStr | Id | None = None
    schema_: StrictStr | None = Field(default=None, alias="schema")

    @property
    def project_id(self) -> int | None:
        return project_number(self.project)


class PredictRequest(_Open):
    """``tasks`` is checked task by task later: one malformed task must not fail the others."""

    tasks: list[Any]
    label_config: StrictStr | None = None
    schema_: StrictStr | None = Field(default=None, alias="schema")
    project: StrictStr | Id | None = None

    @property
    def config_xml(self) -> str | None:
        return self.label_config or self.schema_

    @property
    def project_id(self) -> int | None:
        return project_number(self.project)


class PredictTask(_Open):
    id: Id | None = None
    data: dict[str, Any]
    project: Id | None = None  # Label Studio sends it with every task; the model is chosen by it


def parse(model: type[BaseModel], body: Any, what: str) -> Any:
    """``model`` from a decoded JSON body, or :class:`PayloadError` saying what is wrong."""
    if not isinstance(body, dict):
        raise PayloadError(f"{what}: expected a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise PayloadError(f"{what}: {describe(exc)}") from None


def parse_task(raw: Any) -> PredictTask:
    """One /predict task, or :class:`PayloadError` (the caller gives that task an empty result)."""
    return parse(PredictTask, raw, "task")
