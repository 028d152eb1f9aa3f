"""A plain WSGI entry point (`api.wsgi:app`) for other servers; `bindpolicy serve` runs uvicorn over api.asgi."""

from __future__ import annotations

import gc
import os

from api.app import create_app
from api.logs import configure_logging

configure_logging(os.environ.get("BINDPOLICY_LOG_LEVEL", "INFO"))
app = create_app()
# Everything built so far (compiled policies, parse trees, modules) lives as long as the worker:
# take it out of the collector's sight, so that collections stay short and p99 with them.
gc.collect()
gc.freeze()
