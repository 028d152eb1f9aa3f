"""The Flask app factory: configuration, the policy holder, the decision log, routes and errors."""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Request, Response
from flask.json.provider import DefaultJSONProvider
from flask.sessions import NullSession, SessionInterface

from api.auditing import auditing
from api.authoring import authoring
from api.console import console
from api.errors import register_error_handlers
from api.holder import PolicyHolder, ReloadFailure
from api.metrics import Metrics
from api.routes import routes
from engine.decider import Engine
from engine.decisionlog import Breach, DecisionLog, LogError, Store, open_store
from engine.errors import PolicyLoadError
from engine.evaluator import NATIVE
from engine.impact import Corpus, read_corpus
from engine.loader import load_policies
from engine.logcheck import LogWatch
from engine.logkeys import MacKeyring, read_mac_keys, read_signing_key
from engine.sources import LAST_GOOD, SET_VERSION, ArchiveSource, PolicySource, UnknownDigestError

TAIL_CHECKED = 1000  # records of the log's chain verified when the service starts, and at every check

DEFAULTS: dict[str, Any] = {
    "POLICY_DIR": "policies",
    "DATA_DIR": "data",
    "DATABASE_URL": "",  # empty: sqlite:///<DATA_DIR>/decisions.db
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # bytes of one request body
    # A batch is bounded so that one costs about as much CPU as the costliest single request
    # (under 20 ms, bench/bench_abuse.py): requests, and bytes of its body.
    "MAX_BATCH": 50,  # requests in one batch
    "MAX_BATCH_BYTES": 64 * 1024,  # bytes of one batch's body
    "MAX_LIST_ITEMS": 1000,  # items in any list inside a request (histories, unbind times...)
    "RELOAD_INTERVAL": 1.0,  # seconds between checks of the policy files; 0: no hot reload
    "RUNTIME": NATIVE,
    "LOG_TOKENS": "",  # comma-separated bearer tokens that may read the decision log
    "DECISION_TOKENS": "",  # if set, deciding needs one of these bearer tokens too
    "BIND": "127.0.0.1:8080",  # where the service listens (set by `bindpolicy serve`)
    "SCRATCH": "auto",  # scratch policies in the console: on, off, or auto (on when BIND is loopback)
    "SCRATCH_MAX_BYTES": 512 * 1024,  # one scratch copy, all files together
    "SCRATCH_MAX_SECONDS": 10.0,  # the work on one scratch copy, or on one impact over the corpus
    "CORPUS": "examples/requests.jsonl",  # the requests that impact is judged over in the console
    "LOG_MAC_KEY_FILE": "",  # hex keys, one a line (the first writes): the chain's HMAC; empty: unkeyed
    "CHECKPOINT_KEY_FILE": "",  # Ed25519 private key (PEM) that signs checkpoints; empty: none written
    "CHECKPOINT_DIR": "",  # empty: <DATA_DIR>/checkpoints
    "CHECKPOINT_INTERVAL": 60.0,  # seconds between signed checkpoints
    "LOG_CHECK_INTERVAL": 5.0,  # seconds between the service's checks of its own log; 0: only at start
    "LOG_SWEEP_BUDGET": 0.1,  # of one core: the CPU the re-check of older records may take
}

ENVIRONMENT = {  # configuration key -> environment variable
    "POLICY_DIR": "BINDPOLICY_POLICIES",
    "DATA_DIR": "BINDPOLICY_DATA",
    "DATABASE_URL": "BINDPOLICY_DATABASE_URL",
    "MAX_CONTENT_LENGTH": "BINDPOLICY_MAX_BODY_BYTES",
    "MAX_BATCH": "BINDPOLICY_MAX_BATCH",
    "MAX_BATCH_BYTES": "BINDPOLICY_MAX_BATCH_BYTES",
    "MAX_LIST_ITEMS": "BINDPOLICY_MAX_LIST_ITEMS",
    "RELOAD_INTERVAL": "BINDPOLICY_RELOAD_INTERVAL",
    "RUNTIME": "BINDPOLICY_RUNTIME",
    "LOG_TOKENS": "BINDPOLICY_LOG_TOKENS",
    "DECISION_TOKENS": "BINDPOLICY_DECISION_TOKENS",
    "BIND": "BINDPOLICY_BIND",
    "SCRATCH": "BINDPOLICY_SCRATCH",
    "SCRATCH_MAX_BYTES": "BINDPOLICY_SCRATCH_MAX_BYTES",
    "SCRATCH_MAX_SECONDS": "BINDPOLICY_SCRATCH_MAX_SECONDS",
    "CORPUS": "BINDPOLICY_CORPUS",
    "LOG_MAC_KEY_FILE": "BINDPOLICY_LOG_MAC_KEY_FILE",
    "CHECKPOINT_KEY_FILE": "BINDPOLICY_CHECKPOINT_KEY_FILE",
    "CHECKPOINT_DIR": "BINDPOLICY_CHECKPOINT_DIR",
    "CHECKPOINT_INTERVAL": "BINDPOLICY_CHECKPOINT_INTERVAL",
    "LOG_CHECK_INTERVAL": "BINDPOLICY_LOG_CHECK_INTERVAL",
    "LOG_SWEEP_BUDGET": "BINDPOLICY_LOG_SWEEP_BUDGET",
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service: explicit `config` wins over the environment, which wins over DEFAULTS.

    The policies are loaded and checked here: a policy set with any error never serves.
    """
    app = ServiceFlask(__name__)
    app.json = OrjsonProvider(app)
    app.session_interface = NoSessions()
    app.config.update(DEFAULTS)
    for key, variable in ENVIRONMENT.items():
        if variable in os.environ:
            default = DEFAULTS[key]
            raw = os.environ[variable]
            app.config[key] = type(default)(raw) if isinstance(default, int | float) else raw
    app.config.update(config or {})
    app.config["SCRATCH_ENABLED"] = scratch_enabled(str(app.config["SCRATCH"]), str(app.config["BIND"]))
    metrics = Metrics()
    keys: MacKeyring | None = read_mac_keys(app.config["LOG_MAC_KEY_FILE"]) if app.config["LOG_MAC_KEY_FILE"] else None
    store = open_store(app.config["DATABASE_URL"] or str(Path(app.config["DATA_DIR"]) / "decisions.db"), keys=keys)

    last_good_file = Path(app.config["DATA_DIR"]) / LAST_GOOD

    def loaded(engine: Engine) -> None:
        engine.check.reader  # noqa: B018 (built now, not on the first request: RequestChecker.reader)
        in_force = engine.policies.in_force(datetime.now(UTC))
        metrics.policies_loaded(engine, in_force.name if in_force else None)
        metrics.from_archive.set(0)
        for version in engine.policies:  # keep every content ever served, for exact replay
            store.save_policy(version.digest, version.name, dict(version.sources))
        # The whole set too, under its own digest: what a worker serves if it starts on broken files.
        # It also judged the rejections no version took (unknown_version...): replay reads it by this digest.
        store.save_policy(engine.policies.digest, SET_VERSION, engine.policies.sources)
        # The digest, then the versions it holds: what the next start compares its files with.
        _write_atomically(last_good_file,
                          engine.policies.digest + "\n" + " ".join(v.name for v in engine.policies) + "\n")

    def last_good() -> PolicySource | None:
        try:
            digest = last_good_file.read_text().split("\n", 1)[0].strip()
            source = ArchiveSource(store, digest)
        except (OSError, UnknownDigestError):
            return None
        metrics.from_archive.set(1)
        return source

    def served_before() -> set[str]:
        """The versions of the last good set (older files name only its digest: read from the archive)."""
        try:
            lines = last_good_file.read_text().splitlines()
        except OSError:
            return set()
        if len(lines) > 1:
            return set(lines[1].split())
        try:
            return {v.name for v in load_policies(ArchiveSource(store, lines[0].strip()))} if lines else set()
        except (UnknownDigestError, PolicyLoadError, LogError):
            return set()

    def failed(_: ReloadFailure) -> None:
        metrics.reload_failures.inc()

    holder = PolicyHolder(app.config["POLICY_DIR"], app.config["RUNTIME"],
                          interval=float(app.config["RELOAD_INTERVAL"]),
                          max_list_items=int(app.config["MAX_LIST_ITEMS"]), on_load=loaded, on_failure=failed,
                          last_good=last_good, served_before=served_before)
    tokens = {key: tuple(t.strip() for t in str(app.config[key]).split(",") if t.strip())
              for key in ("LOG_TOKENS", "DECISION_TOKENS")}
    signing = app.config["CHECKPOINT_KEY_FILE"]
    watch = LogWatch(store, interval=float(app.config["LOG_CHECK_INTERVAL"]), tail=TAIL_CHECKED,
                     budget=float(app.config["LOG_SWEEP_BUDGET"]),
                     signing_key=read_signing_key(signing) if signing else None,
                     checkpoint_dir=Path(app.config["CHECKPOINT_DIR"] or Path(app.config["DATA_DIR"]) / "checkpoints"),
                     checkpoint_interval=float(app.config["CHECKPOINT_INTERVAL"]),
                     on_breach=lambda breach: metrics.log_breach.set(breach.seq))
    # The chain's tail is checked at start, then new records as they come: an altered log is
    # reported (readyz, metrics, logs), never extended silently, and never stops the service.
    watch.start()
    if watch.interval > 0:  # a running service: a graceful stop signs the head
        atexit.register(watch.close)
    if keys is None:
        logging.getLogger("bindpolicy.log").warning(
            "decision log without a MAC key: records are chained with plain SHA-256", extra={
                "event": "log_unkeyed", "hint": "set BINDPOLICY_LOG_MAC_KEY_FILE (bindpolicy log keygen)"})
    service = Service(holder, store, metrics, tokens, watch, Path(app.config["CORPUS"]))
    app.extensions["bindpolicy"] = service
    app.register_blueprint(routes)
    app.register_blueprint(authoring)
    app.register_blueprint(auditing)
    app.register_blueprint(console)
    register_error_handlers(app)
    return app


def scratch_enabled(setting: str, bind: str) -> bool:
    """SCRATCH on or off as said; auto: on only when the service listens on a loopback address
    (or a Unix socket), where no one but this machine's users can send policies to compile."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"BINDPOLICY_SCRATCH must be auto, on or off, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    if bind.startswith("unix:"):
        return True
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    temporary.replace(path)


class ServiceFlask(Flask):
    """Flask, with what it works out again for every request kept: whether each hook and view is a
    coroutine (inspect's checks, three a request, about 10 µs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync[func]
        except KeyError:
            made = self._sync[func] = super().ensure_sync(func)
            return made
        except TypeError:  # (not hashable)
            return super().ensure_sync(func)


class NoSessions(SessionInterface):
    """The service keeps no sessions and reads no cookie: every request gets the same empty
    session, which cannot be written (Flask's default looked for a signing key and made a new
    null session for each request, then checked it again to save it)."""

    null_session = NullSession()

    def open_session(self, app: Flask, request: Request) -> NullSession:
        return self.null_session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        return None


class OrjsonProvider(DefaultJSONProvider):
    """Responses serialized by orjson (several times faster); key order as built."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        try:
            return orjson.dumps(obj).decode()
        except TypeError:
            return super().dumps(obj, **kwargs)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj)
        except TypeError:
            body = super().dumps(obj).encode()
        return Response(body, mimetype=self.mimetype)


class Service:
    """What the routes need: the policies in service, the decision log, the metrics."""

    def __init__(self, holder: PolicyHolder, store: Store, metrics: Metrics,
                 tokens: Mapping[str, tuple[str, ...]], watch: LogWatch, corpus: Path | None = None) -> None:
        self.holder = holder
        self.log: DecisionLog = store  # what deciding needs: the one write method
        self.store = store  # what reading needs: records, the chain, policy contents
        self.metrics = metrics
        self.tokens = tokens  # LOG_TOKENS, DECISION_TOKENS: the bearer tokens each accepts
        self.watch = watch  # the log's own check of itself: chain, checkpoints
        self.corpus_path = corpus
        self._corpus: Corpus | None = None
        self.console_cache: dict[Any, Any] = {}  # what the console asks for again and again (examples)

    @property
    def chain_breach(self) -> Breach | None:
        return self.watch.breach

    def corpus(self) -> Corpus:
        """The requests impact is judged over, read once by the engine's reader (that of `bindpolicy
        impact`); none when the configured corpus is not there. InputError when it cannot be read."""
        if self._corpus is None:
            exists = self.corpus_path is not None and self.corpus_path.exists()
            self._corpus = read_corpus([str(self.corpus_path)]) if exists else Corpus()
        return self._corpus
