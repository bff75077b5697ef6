"""The served backend: the ML backend (:mod:`ml_backend.app`) with the job queue and the admin dashboard wired in."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from ml_backend.app import create_app
from ml_backend.settings import Settings

from . import dashboard, jobs


def create_backend(settings: Settings | None = None, *, warm_up: bool = True) -> Flask:
    settings = settings or Settings.from_env()
    app = create_app(settings, warm_up=warm_up, enqueue_job=jobs.enqueue_training_job)

    def export(project: int, fmt: str, out: Path) -> object:
        from training.export import ExportOptions, export_project

        from . import labelstudio

        return export_project(settings, labelstudio.client(settings), project, out, ExportOptions(fmt),
                              progress=False)

    app.register_blueprint(dashboard.blueprint(
        settings, queue_depth=lambda: jobs.queue_status(settings),
        request_training=lambda project: jobs.request_training(settings, project, "dashboard"), export=export))
    return app
