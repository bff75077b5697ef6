"""gunicorn settings for the ML backend, from the same settings as everything else.

``gunicorn -c python:loopscribe.gunicorn_conf --bind ADDRESS loopscribe.wsgi:app`` (``up`` and
docker compose both run this). One process holds the model; ``BACKEND_THREADS`` threads serve
requests, of which at most ``MAX_CONCURRENT_PREDICTS`` wait on the model, so the rest stay free for
``/health``, ``/setup`` and webhooks. Clients never reach gunicorn directly: nginx sits in front
(:mod:`loopscribe.proxy`) and hands over complete requests only.
"""

from ml_backend.settings import Settings

_settings = Settings.from_env()

worker_class = "gthread"
workers = 1
threads = max(_settings.backend_threads, _settings.max_concurrent_predicts + 2)
timeout = 300  # a worker silent this long is restarted (model loads and long batches stay under it)
graceful_timeout = 30
accesslog = "-"
control_socket_disable = True  # gunicorn ≥ 24's shared ~/.gunicorn control socket: several stacks would clash
