"""The WSGI entry point for gunicorn: `gunicorn api.wsgi:app` (configured from the environment)."""

from __future__ import annotations

import os

from api.app import create_app
from api.logs import configure_logging

configure_logging(os.environ.get("BINDPOLICY_LOG_LEVEL", "INFO"))
app = create_app()
