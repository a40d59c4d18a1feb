"""Entry point of both processes: `gunicorn wsgi:app` (web) and `huey_consumer wsgi.huey` (worker)."""
from bot import create_app
from bot.delivery.queue import huey  # noqa: F401  (the worker's consumer loads it from here)

app = create_app()
