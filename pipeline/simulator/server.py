"""The simulated provider: an aiohttp application with routing, stats and live config."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import defaultdict
from typing import Any

import orjson
from aiohttp import web

from . import errors as E
from .batches import BatchStore
from .behaviour import (
    Completion,
    Triggers,
    cache_prefix,
    estimate_prompt_tokens,
    make_completion,
    normalize_messages,
    request_digest,
)
from .config import FAULT_KINDS, SimulatorConfig
from .handlers import Dropped, complete
from .ratelimit import RateLimiter
from .structured import Output

MODEL_CREATED = 1700000000
NO_RESPONSE = 0  # by_status key for connections closed without an answer


class Stats:
    """Counters behind ``/_sim/stats`` (mutated only on the server's event loop)."""

    def __init__(self) -> None:
        self.requests = 0
        self.completions = 0
        self.by_status: defaultdict[int, int] = defaultdict(int)
        self.rate_limited = 0
        self.faults: defaultdict[str, int] = defaultdict(int)
        self.paid_by_digest: defaultdict[str, int] = defaultdict(int)
        self.duplicate_paid = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.cached_tokens = 0
        self.batches_created = 0
        self.files_uploaded = 0
        self.batch_requests_paid = 0

    def paid(self, key: str, c: Completion) -> None:
        self.answered(key)
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.reasoning_tokens += c.reasoning_tokens
        self.cached_tokens += c.cached_tokens

    def answered(self, key: str) -> None:
        """One paid answer to the request with this key (a second one is a duplicate)."""
        self.completions += 1
        n = self.paid_by_digest[key] + 1
        self.paid_by_digest[key] = n
        if n > 1:
            self.duplicate_paid += 1

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "completions": self.completions,
            "by_status": dict(sorted(self.by_status.items())),
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "duplicate_paid": self.duplicate_paid,
            "distinct_paid": len(self.paid_by_digest),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "batches_created": self.batches_created,
            "files_uploaded": self.files_uploaded,
            "batch_requests_paid": self.batch_requests_paid,
        }
        if full:
            out["paid_by_digest"] = dict(self.paid_by_digest)
        return out


class Simulator:
    """A simulated LLM provider.

    Serve it with :meth:`start` / :meth:`stop` on a running loop, or mount
    :meth:`make_app` yourself. Not thread-safe: use it from its loop's thread
    (``start_in_thread`` wraps that for other threads).
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self._config = config or SimulatorConfig()
        self.stats_obj = Stats()
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.json_attempts: defaultdict[str, int] = defaultdict(int)
        self.prompt_cache: set[str] = set()
        self._apply(self._config, first=True)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.batch_store = BatchStore(self)

    # --- configuration and stats ------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def _apply(self, cfg: SimulatorConfig, first: bool = False) -> None:
        old = self._config
        self._config = cfg
        self.models = frozenset(cfg.models)
        limits = ("rpm", "tpm", "limit_window", "report_window", "limiter_style")
        if first or any(getattr(old, k) != getattr(cfg, k) for k in limits):
            self.limiter = _limiter(cfg)
        if first or old.seed != cfg.seed:
            self._rng = random.Random(cfg.seed)
            self._latency_rng = random.Random(cfg.seed + 1)
        self._faults = [(k, float(getattr(cfg, k))) for k in FAULT_KINDS if getattr(cfg, k)]
        throttle = ("throttle_s", "throttle_retry_after_s")
        if first or any(getattr(old, k) != getattr(cfg, k) for k in throttle):
            self._throttle_from: float | None = None

    def configure(self, **fields: Any) -> SimulatorConfig:
        """Change config fields live (validated; unknown names raise)."""
        self._apply(self._config.updated(**fields))
        return self._config

    def stats(self, full: bool = True) -> dict[str, Any]:
        return self.stats_obj.snapshot(full)

    def finish_batches(self) -> int:
        """Every batch open now ends at its next look, whatever the turnaround."""
        return self.batch_store.finish_open()

    def reset(self) -> None:
        """Zero the stats, the fail_first/drop_first/bad_json attempt counters and the
        limits."""
        in_flight = self.stats_obj.in_flight
        self.stats_obj = Stats()
        self.stats_obj.in_flight = in_flight
        self.attempts.clear()
        self.json_attempts.clear()
        self.prompt_cache.clear()
        self.batch_store.close()
        self.batch_store = BatchStore(self)
        cfg = self._config
        self.limiter = _limiter(cfg)
        self._throttle_from = None

    # --- lifecycle --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        # Anthropic batch bodies may reach 256 MB; file uploads are streamed, not read.
        app = web.Application(client_max_size=300 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve on the running loop; returns the bound port."""
        runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=2048).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.batch_store.close()

    # --- routing ----------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        method = request.method
        if "/batches" in path or "/files" in path:
            try:
                batch_response = await self.batch_store.dispatch(request, path)
            except E.Reject as r:
                return r.response
            if batch_response is not None:
                return batch_response
        if path.endswith("/chat/completions"):
            if method != "POST":
                err = E.openai_error("Method not allowed.", "invalid_request_error")
                return E.json_response(err, 405)
            return await self._completion(request, anthropic=False)
        if path.endswith("/messages/count_tokens"):
            return await self._count_tokens(request)
        if path.endswith("/messages"):
            if method != "POST":
                return E.json_response(E.anthropic_error(405, "Method not allowed."), 405)
            return await self._completion(request, anthropic=True)
        if path.endswith("/models") and method == "GET":
            return self._list_models(request)
        if path.startswith("/_sim/"):
            return await self._control(request, path[6:])
        msg = f"Unknown request URL: {method} {request.path}."
        return E.json_response(E.openai_error(msg, "invalid_request_error", "unknown_url"), 404)

    async def _control(self, request: web.Request, what: str) -> web.StreamResponse:
        if what == "health":
            return E.json_response({"status": "ok"})
        if what == "stats":
            full = request.query.get("full", "") not in ("", "0", "false")
            return E.json_response(self.stats(full))
        if what == "reset" and request.method == "POST":
            self.reset()
            return E.json_response({"status": "ok"})
        if what == "config":
            if request.method == "POST":
                try:
                    self.configure(**orjson.loads(await request.read()))
                except Exception as exc:
                    return E.json_response({"error": str(exc)}, 400)
            return E.json_response(self._config.model_dump(mode="json"))
        return E.json_response({"error": f"unknown control endpoint {what}"}, 404)

    async def _completion(self, request: web.Request, anthropic: bool) -> web.StreamResponse:
        st = self.stats_obj
        now = time.time()
        st.requests += 1
        if st.first_request_at is None:
            st.first_request_at = now
        st.last_request_at = now
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight
        status = NO_RESPONSE
        try:
            try:
                resp = await complete(self, request, anthropic)
            except E.Reject as r:
                resp = r.response
            if not isinstance(resp, Dropped):
                status = resp.status
            return resp
        finally:
            # a reset() during the request replaced stats_obj: count into the new one
            st.in_flight -= 1
            cur = self.stats_obj
            if cur is not st:
                cur.in_flight = max(0, cur.in_flight - 1)
            cur.by_status[status] += 1
            if status == 429:
                cur.rate_limited += 1

    # --- helpers used by handlers.complete --------------------------------------------

    async def read_body(self, request: web.Request, anthropic: bool) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            msg = "We could not parse the JSON body of your request."
            raise E.Reject(self.invalid(msg, anthropic))
        return body

    @staticmethod
    def invalid(msg: str, anthropic: bool, param: str | None = None) -> web.Response:
        if anthropic:
            return E.json_response(E.anthropic_error(400, msg), 400)
        return E.json_response(E.openai_error(msg, "invalid_request_error", None, param), 400)

    @staticmethod
    def _given_keys(request: web.Request, body: dict[str, Any] | None) -> list[str]:
        keys: list[str] = []
        auth = request.headers.get("Authorization")
        if auth:
            keys.append(auth[7:].strip() if auth[:7].lower() == "bearer " else auth.strip())
        xkey = request.headers.get("x-api-key")
        if xkey:
            keys.append(xkey.strip())
        if body is not None and isinstance(body.get("key"), str):
            keys.append(body["key"])
        return keys

    def check_auth(
        self, request: web.Request, body: dict[str, Any] | None, anthropic: bool
    ) -> None:
        expected = self._config.api_key
        if expected is None:
            return
        given = self._given_keys(request, body)
        if expected in given:
            return
        style = self._config.auth_error_style
        if anthropic and style != "modelslab":
            msg = "invalid x-api-key" if given else "x-api-key header is required"
            raise E.Reject(E.json_response(E.anthropic_error(401, msg), 401))
        status, err = E.auth_error(style, given[0] if given else None)
        raise E.Reject(E.json_response(err, status))

    def _list_models(self, request: web.Request) -> web.StreamResponse:
        try:
            self.check_auth(request, None, anthropic=False)
        except E.Reject as r:
            return r.response
        data = [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "simulator"}
            for m in self._config.models
        ]
        return E.json_response({"object": "list", "data": data})

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self.read_body(request, anthropic=True)
            self.check_auth(request, body, anthropic=True)
        except E.Reject as r:
            return r.response
        msgs = normalize_messages(body.get("messages"), body.get("system"))
        return E.json_response({"input_tokens": estimate_prompt_tokens(msgs)})

    def throttled(self, now: float) -> bool:
        """Whether `throttle_s` still holds every request back at `now` (wall clock)."""
        if not self._config.throttle_s:
            return False
        if self._throttle_from is None:
            self._throttle_from = now
        return now - self._throttle_from < self._config.throttle_s

    def draw_fault(self, stream: bool) -> str | None:
        """One uniform draw against the cumulative fault probabilities."""
        if not self._faults:
            return None
        u = self._rng.random()
        acc = 0.0
        for kind, p in self._faults:
            acc += p
            if u < acc:
                return None if kind == "truncate_stream" and not stream else kind
        return None

    def latency_s(self, triggers: Triggers | None) -> float:
        lo, hi = self._config.latency_ms
        ms = 0.0
        if hi > 0:
            ms = lo if hi == lo else self._latency_rng.uniform(lo, hi)
        if triggers is not None:
            ms += triggers.slow_ms
        return ms / 1000.0

    @staticmethod
    async def sleep(seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    def cached(self, body: dict[str, Any], model: str, c: Completion) -> Completion:
        """`c` with Anthropic prompt caching applied: the prefix up to the request's
        breakpoint read from the cache when seen before, else written to it."""
        prefix = cache_prefix(body)
        if prefix is None:
            return c
        tokens = estimate_prompt_tokens(prefix) if prefix else 0
        if tokens < self._config.prompt_cache_min_tokens or tokens > c.prompt_tokens:
            return c
        key = request_digest(model, prefix)
        if key in self.prompt_cache:
            return dataclasses.replace(c, cached_tokens=tokens, cache_write_tokens=0)
        self.prompt_cache.add(key)
        return dataclasses.replace(c, cached_tokens=0, cache_write_tokens=tokens)

    def replay_entry(self, index: int) -> dict[str, Any]:
        """Canned answer `index` of the configuration (an invalid request if none)."""
        entries = self._config.replay
        if index >= len(entries):
            raise E.Reject(self.invalid(f"no replay entry {index}", False))
        return entries[index]

    def completion_for(
        self,
        model: str,
        msgs: list[dict[str, Any]],
        max_tokens: int | None,
        with_reasoning: bool,
        triggers: Triggers | None,
        prompt_tokens: int | None = None,
        output: Output | None = None,
    ) -> Completion:
        return make_completion(
            model,
            msgs,
            with_reasoning=with_reasoning,
            max_tokens=max_tokens,
            cached_fraction=self._config.cached_fraction,
            triggers=triggers,
            prompt_tokens=prompt_tokens,
            output=output,
        )

    def limit_headers(self, anthropic: bool, now: float) -> dict[str, str] | None:
        lim = self.limiter
        if not lim.active or not self._config.send_ratelimit_headers:
            return None
        return lim.anthropic_headers(now) if anthropic else lim.openai_headers(now)


def _limiter(cfg: SimulatorConfig) -> RateLimiter:
    return RateLimiter(
        cfg.rpm,
        cfg.tpm,
        cfg.limit_window,
        time.time(),
        report_window=cfg.report_window,
        style=cfg.limiter_style,
    )
