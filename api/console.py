"""The web console: static pages served from the repository under /console/, under a strict CSP.

The page holds no data of its own: everything it shows comes from the documented JSON API
(`/openapi.json`), called from the same origin with the caller's language.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, redirect, send_from_directory

STATIC = Path(__file__).resolve().parent / "static" / "console"
# No inline script or style, nothing from elsewhere: the page reaches only its own origin.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain",
         ".svg": "image/svg+xml", ".png": "image/png"}

console = Blueprint("console", __name__)


@console.get("/console")
def console_root() -> Response:
    return redirect("/console/", code=308)  # type: ignore[return-value]


@console.get("/console/", defaults={"name": "index.html"})
@console.get("/console/<path:name>")
def console_file(name: str) -> Response:
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file() or path.suffix not in TYPES:
        abort(404)
    response = send_from_directory(STATIC, path.relative_to(STATIC).as_posix(), mimetype=TYPES[path.suffix],
                                   max_age=0)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    return response
