"""gunicorn entry point: ``gunicorn 'ml_backend.wsgi:app'``."""

import logging

from .app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(warm_up=True)
