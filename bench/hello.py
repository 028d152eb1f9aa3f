"""The reference of bench/bench_service.py: a minimal Flask "hello" app, served by gunicorn with
3 gthread workers (`gunicorn -k gthread -w 3 bench.hello:app`)."""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)


@app.post("/hello")
@app.get("/healthz")
def hello() -> str:
    return "hello"
