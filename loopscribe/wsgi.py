"""gunicorn entry point: ``gunicorn 'loopscribe.wsgi:app'`` — the backend with the job queue and dashboard."""

from .backend import create_backend

app = create_backend()
