"""The Flask app factory: configuration, the engine, routes and error handlers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from api.errors import register_error_handlers
from api.routes import routes
from engine.decider import Engine
from engine.loader import load_policies

DEFAULTS: dict[str, Any] = {
    "POLICY_DIR": "policies",
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # bytes of one request body
    "MAX_BATCH": 1000,  # requests in one batch
}

ENVIRONMENT = {  # configuration key -> environment variable
    "POLICY_DIR": "BINDPOLICY_POLICIES",
    "MAX_CONTENT_LENGTH": "BINDPOLICY_MAX_BODY_BYTES",
    "MAX_BATCH": "BINDPOLICY_MAX_BATCH",
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service: explicit `config` wins over the environment, which wins over DEFAULTS."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    for key, variable in ENVIRONMENT.items():
        if variable in os.environ:
            value: Any = os.environ[variable]
            app.config[key] = int(value) if isinstance(DEFAULTS[key], int) else value
    app.config.update(config or {})
    app.extensions["bindpolicy.engine"] = Engine(load_policies(app.config["POLICY_DIR"]))
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(routes)
    register_error_handlers(app)
    return app
