"""The entry point for uvicorn: `uvicorn --http api.server:JsonHttpProtocol api.asgi:app` (`bindpolicy serve` runs it).

The Flask app behind the buffering front (api/front.py), configured from the environment.
"""

from __future__ import annotations

import gc
import os

from api.app import create_app
from api.front import BufferedFront
from api.logs import configure_logging
from api.metrics import forget_dead_workers

configure_logging(os.environ.get("BINDPOLICY_LOG_LEVEL", "INFO"))
forget_dead_workers()
flask_app = create_app()
app = BufferedFront(flask_app.wsgi_app, max_body=int(flask_app.config["MAX_CONTENT_LENGTH"]),
                    threads=int(os.environ.get("BINDPOLICY_THREADS", "8")),
                    # a graceful stop signs the log's head (uvicorn's workers exit without atexit)
                    on_shutdown=flask_app.extensions["bindpolicy"].watch.close)
# Watch the policy files from the start: a worker that has not served yet must not wake on a stale set.
flask_app.extensions["bindpolicy"].holder.ensure_watching()
# Everything built so far (compiled policies, parse trees, modules) lives as long as the worker:
# take it out of the collector's sight, so that collections stay short and p99 with them.
gc.collect()
gc.freeze()
