"""Errors a user can act on. The CLI prints a :class:`LoopscribeError` as one line (exit 2); anything
else is a defect and keeps its traceback."""

from __future__ import annotations


class LoopscribeError(Exception):
    """A problem with the input, the configuration or the environment, said in words."""


class ConfigurationError(LoopscribeError, ValueError):
    """A setting, option or argument that cannot work (an unknown language, an invalid value)."""


class EnvironmentProblem(LoopscribeError, RuntimeError):
    """Something the machine lacks or a service that does not start (nginx, Label Studio, a model)."""


class AudioError(LoopscribeError, ValueError):
    """Audio that cannot be used; ``source`` names it so one bad item in a batch is easy to find.

    Base of :class:`~ml_backend.fetch.AudioFetchError` (cannot be fetched) and
    :class:`~ml_backend.audio.AudioDecodeError` (cannot be decoded).
    """

    def __init__(self, source: str, reason: str):
        from .safelog import clip

        source = clip(source)
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
