"""The Flask app factory: configuration, the policy holder, the decision log, routes and errors."""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Request, Response, request, request_finished, request_started, request_tearing_down
from flask.app import _sentinel  # type: ignore[attr-defined]
from flask.ctx import RequestContext
from flask.globals import _cv_app, _cv_request, request_ctx
from flask.json.provider import DefaultJSONProvider
from flask.sessions import NullSession, SessionInterface
from werkzeug.exceptions import HTTPException
from werkzeug.routing import MapAdapter, Rule

from api.answer import Answer
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
from engine.logwriter import WriterClient
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
    writer_socket = os.environ.get("BINDPOLICY_LOG_WRITER_SOCKET")
    if writer_socket:  # the log's writer process commits for every worker (api/supervisor.py)
        service.log = WriterClient(writer_socket, store)
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
    coroutine (inspect's checks, three a request, about 10 µs), and the route of each path that
    has no variable part (see _Lane). The hooks, the error handlers, the request and app contexts,
    the `request`, `g` and `current_app` of every view are Flask's own."""

    response_class = Answer  # (api/answer.py: whole bytes handed to the server as they are)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}
        self._lanes: dict[tuple[str, str], Rule] | None = None  # made at the first request
        self._hook_lists: dict[tuple[str, str | None], list[Callable[..., Any]]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync[func]
        except KeyError:
            made = self._sync[func] = super().ensure_sync(func)
            return made
        except TypeError:  # (not hashable)
            return super().ensure_sync(func)

    def request_context(self, environ: dict[str, Any]) -> RequestContext:
        """A request to a path of one route without variable parts (`POST /v1/decisions`, `GET
        /healthz`...) gets its rule from a dict instead of werkzeug's matcher, and its URL adapter
        only if something asks for it (url_for: nothing on those routes does); any other is Flask's."""
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = _static_lanes(self)
        rule = lanes.get((environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")))
        if rule is None:
            return super().request_context(environ)
        return _Lane(self, environ, rule)

    def full_dispatch_request(self) -> Response:
        """Flask's, with its request_started and request_finished signals sent only when someone
        listens (blinker sends to no one at about 1 µs each)."""
        self._got_first_request = True
        try:
            if request_started.receivers:
                request_started.send(self, _async_wrapper=self.ensure_sync)
            rv = self.preprocess_request()
            if rv is None:
                rv = self.dispatch_request()
        except Exception as e:
            rv = self.handle_user_exception(e)
        return self.finalize_request(rv)

    def _hooks(self, kind: str) -> list[Callable[..., Any]]:
        """The hooks of the request's endpoint in the order Flask calls them (its blueprints'
        and the app's), worked out once per endpoint: `before` (URL value preprocessors, then
        before_request), `after` (after_request), `teardown` (teardown_request). Flask forbids
        adding a hook once the first request came, so the lists stay true."""
        endpoint = request.endpoint
        found = self._hook_lists.get((kind, endpoint))
        if found is not None:
            return found
        blueprints = request.blueprints
        made: list[Callable[..., Any]] = []
        if kind == "before":
            names = (None, *reversed(blueprints))
            preprocessors = self.url_value_preprocessors
            made += [partial(_preprocess_url, func) for name in names for func in preprocessors.get(name, ())]
            made += [self.ensure_sync(func) for name in names for func in self.before_request_funcs.get(name, ())]
        else:
            funcs = self.after_request_funcs if kind == "after" else self.teardown_request_funcs
            made += [self.ensure_sync(func) for name in (*blueprints, None) for func in reversed(funcs.get(name, []))]
        self._hook_lists[(kind, endpoint)] = made
        return made

    def preprocess_request(self) -> Any:
        """Flask's, with the endpoint's hooks listed once (_hooks)."""
        for func in self._hooks("before"):
            rv = func()
            if rv is not None:
                return rv
        return None

    def process_response(self, response: Response) -> Response:
        """Flask's, with the endpoint's hooks listed once (_hooks)."""
        ctx = request_ctx._get_current_object()  # type: ignore[attr-defined]
        for func in ctx._after_request_functions:
            response = self.ensure_sync(func)(response)
        for func in self._hooks("after"):
            response = func(response)
        if not self.session_interface.is_null_session(ctx._session):
            self.session_interface.save_session(self, ctx._session, response)
        return response

    def do_teardown_request(self, exc: BaseException | None = _sentinel) -> None:  # type: ignore[assignment]
        """Flask's, with the endpoint's hooks listed once (_hooks) and request_tearing_down sent
        only when someone listens."""
        if exc is _sentinel:
            exc = sys.exc_info()[1]
        for func in self._hooks("teardown"):
            func(exc)
        if request_tearing_down.receivers:
            request_tearing_down.send(self, _async_wrapper=self.ensure_sync, exc=exc)

    def finalize_request(self, rv: Any, from_error_handler: bool = False) -> Response:
        if request_finished.receivers:
            return super().finalize_request(rv, from_error_handler)
        response = rv if type(rv) is Response else self.make_response(rv)
        try:
            return self.process_response(response)
        except Exception:
            if not from_error_handler:
                raise
            self.logger.exception("Request finalizing failed with an error while handling an error")
        return response


def _preprocess_url(func: Callable[..., Any]) -> None:
    func(request.endpoint, request.view_args)  # (a URL value preprocessor returns nothing that counts)


def _static_lanes(app: Flask) -> dict[tuple[str, str], Rule]:
    """(method, path) -> the rule werkzeug's matcher gives that request, for every rule without
    variable parts, defaults or redirect, each checked against the matcher itself; none where
    hosts or subdomains take part in matching (SERVER_NAME, TRUSTED_HOSTS, host or subdomain
    matching): the host would have to be read first."""
    url_map = app.url_map
    if (app.config["SERVER_NAME"] is not None or app.config.get("TRUSTED_HOSTS") is not None
            or url_map.host_matching or app.subdomain_matching):
        return {}
    adapter = url_map.bind("localhost")
    lanes: dict[tuple[str, str], Rule] = {}
    for rule in url_map.iter_rules():
        if (rule.arguments or rule.defaults or rule.redirect_to is not None or rule.build_only or rule.websocket
                or rule.host or rule.subdomain or not rule.rule.isascii()):
            continue
        for method in rule.methods or ():
            if method == "OPTIONS":  # (Flask answers OPTIONS itself, in dispatch_request)
                continue
            try:
                matched, arguments = adapter.match(rule.rule, method=method, return_rule=True)
            except HTTPException:
                continue
            if matched is rule and not arguments:
                lanes[(method, rule.rule)] = rule
    return lanes


class _Lane(RequestContext):
    """Flask's request context for a request whose rule is known already (ServiceFlask's lanes):
    pushed and popped as Flask's, with the rule set instead of matched, and the URL adapter (the
    host read, werkzeug's MapAdapter bound) made only when asked for."""

    def __init__(self, app: Flask, environ: dict[str, Any], rule: Rule) -> None:  # (no super: no adapter)
        self.app = app
        request = app.request_class(environ)
        request.json_module = app.json
        request.url_rule, request.view_args = rule, {}
        self.request = request
        self.flashes = None
        self._session = None
        self._after_request_functions = []
        self._cv_tokens = []
        self._adapter: MapAdapter | None = None
        self._adapted = False

    @property
    def url_adapter(self) -> MapAdapter | None:
        if not self._adapted:
            self._adapter, self._adapted = self.app.create_url_adapter(self.request), True
        return self._adapter

    @url_adapter.setter
    def url_adapter(self, adapter: MapAdapter | None) -> None:
        self._adapter, self._adapted = adapter, True

    def push(self) -> None:
        """RequestContext.push without the matching (the rule is set)."""
        app_ctx = _cv_app.get(None)
        if app_ctx is None or app_ctx.app is not self.app:
            app_ctx = self.app.app_context()
            app_ctx.push()
        else:
            app_ctx = None
        self._cv_tokens.append((_cv_request.set(self), app_ctx))
        if self._session is None:
            session_interface = self.app.session_interface
            self._session = session_interface.open_session(self.app, self.request)
            if self._session is None:
                self._session = session_interface.make_null_session(self.app)


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
        return Answer(body, mimetype=self.mimetype)


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
