"""gunicorn entry point: ``gunicorn 'loopscribe.wsgi:app'`` — the backend with the job queue wired in."""

from ml_backend.app import create_app

from .jobs import enqueue_training_job

app = create_app(warm_up=True, enqueue_job=enqueue_training_job)
