"""The completion flow shared by Chat Completions and Anthropic Messages.

Order of checks: JSON body, key, model, required fields (tool_choice included),
concurrency slots, RPM/TPM, in-band ``[[sim:...]]`` triggers, random faults, latency,
then the (paid) answer.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import errors as E
from . import payloads as P
from .behaviour import (
    Triggers,
    estimate_prompt_tokens,
    go_duration,
    normalize_messages,
    parse_triggers,
)
from .behaviour import request_key as make_request_key
from .ratelimit import Rejection, retry_headers
from .structured import Output, OutputError, anthropic_output, openai_output

if TYPE_CHECKING:
    from .server import Simulator

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_BUSY = {"status": "error", "message": "Server busy, try again"}


class Dropped(web.Response):
    """Returned when the connection was closed without (a complete) answer."""


def _thinking(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _forces_tool(choice: Any) -> bool:
    return isinstance(choice, dict) and choice.get("type") in ("any", "tool")


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _merge(a: dict[str, str] | None, b: dict[str, str] | None) -> dict[str, str] | None:
    if not a:
        return b
    if not b:
        return a
    return {**a, **b}


def drop(request: web.Request) -> web.Response:
    """Close the socket without any answer: the client sees a server disconnect."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return Dropped()


def status_response(
    status: int, anthropic: bool, headers: dict[str, str] | None = None
) -> web.Response:
    body = E.anthropic_status_error(status) if anthropic else E.openai_status_error(status)
    if status in (429, 503, 529):
        headers = _merge(headers, {"retry-after": "1"})
    return E.json_response(body, status, headers)


def rate_limited(
    rej: Rejection, model: str, anthropic: bool, headers: dict[str, str] | None
) -> web.Response:
    wait = go_duration(rej.retry_after_s)
    retry = retry_headers(rej.retry_after_s)
    if anthropic:
        unit = "requests" if rej.kind == "requests" else "tokens"
        msg = (
            f"This request would exceed the rate limit for your organization of {rej.limit} "
            f"{unit} per minute (used {rej.used}, requested {rej.requested}). "
            f"Please try again in {wait}."
        )
        h = _merge(headers, {"retry-after": retry["retry-after"]})
        return E.json_response(E.anthropic_error(429, msg), 429, h)
    what = "requests per min (RPM)" if rej.kind == "requests" else "tokens per min (TPM)"
    msg = (
        f"Rate limit reached for {model} in organization org-simulator on {what}: "
        f"Limit {rej.limit}, Used {rej.used}, Requested {rej.requested}. "
        f"Please try again in {wait}. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    body = E.openai_error(msg, rej.kind, "rate_limit_exceeded")
    return E.json_response(body, 429, _merge(headers, retry))


def throttled(retry_after_s: float, model: str, anthropic: bool) -> web.Response:
    """A 429 with the same whole-second `retry-after` every time, and no limit headers."""
    wait = go_duration(retry_after_s)
    headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))}
    if anthropic:
        msg = f"Number of requests has exceeded your rate limit. Please try again in {wait}."
        return E.json_response(E.anthropic_error(429, msg), 429, headers)
    msg = f"Rate limit reached for {model}: the service is at capacity. Please try again in {wait}."
    body = E.openai_error(msg, "requests", "rate_limit_exceeded")
    return E.json_response(body, 429, headers)


def litellm_rate_limited(rej: Rejection, headers: dict[str, str] | None) -> web.Response:
    """LiteLLM's per-key limiter: the window length as retry-after, whatever is left of it."""
    msg = (
        f"Rate limit exceeded for model_per_key: {rej.kind} limit {rej.limit}, "
        f"used {rej.used}. Remaining: 0"
    )
    body = {"error": {"message": msg, "type": "None", "param": "None", "code": "429"}}
    retry = {"retry-after": str(int(rej.retry_after_s))}
    return E.json_response(body, 429, _merge(headers, retry))


def _triggered(
    sim: Simulator,
    request: web.Request,
    t: Triggers,
    key: str,
    anthropic: bool,
    prompt: int,
    headers: dict[str, str] | None,
) -> web.Response | None:
    faults = sim.stats_obj.faults
    if t.any_first:
        sim.attempts[key] += 1
        n = sim.attempts[key]
        if n <= t.fail_first:
            faults["fail_first"] += 1
            return status_response(503, anthropic, headers)
        if n <= t.fail_first + t.drop_first:
            faults["drop_first"] += 1
            return drop(request)
    if t.status is not None:
        faults["sim_status"] += 1
        return status_response(t.status, anthropic, headers)
    if t.quota:
        faults["sim_quota"] += 1
        if anthropic:
            body = E.anthropic_error(
                429,
                "You have reached your specified API usage limits.",
                details={"error_code": "enforced_spend_limit_reached"},
            )
        else:
            body = E.openai_error(E.QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
        return E.json_response(body, 429, headers)
    if t.context:
        faults["sim_context"] += 1
        body = E.context_error_anthropic(prompt) if anthropic else E.context_error_openai(prompt)
        return E.json_response(body, 400, headers)
    return None


def _over_window(prompt: int, window: int, anthropic: bool) -> web.Response:
    if anthropic:
        return E.json_response(E.context_error_anthropic(prompt, window), 400)
    return E.json_response(E.context_error_openai(prompt, window), 400)


def _fault_response(fault: str, request: web.Request, anthropic: bool, model: str) -> web.Response:
    if fault == "fail_500":
        return status_response(500, anthropic)
    if fault == "fail_503":
        return status_response(503, anthropic)
    if fault == "fail_529":
        return status_response(529, anthropic)
    if fault == "drop_connection":
        return drop(request)
    if fault == "status_error_200":
        return E.json_response(_BUSY)
    if fault == "fail_502_html":
        return _html(502, "502 Bad Gateway")
    if fault == "html_200":
        return _html(200, "Please sign in to continue")
    if fault == "wrong_shape_200":
        shapes = _WRONG_SHAPES_ANTHROPIC if anthropic else _WRONG_SHAPES_OPENAI
        return E.json_response(shapes[next(_wrong_shape_turn) % len(shapes)])
    # malformed: HTTP 200 whose JSON body stops halfway
    if anthropic:
        text = f'{{"id":"msg_sim","type":"message","role":"assistant","model":"{model}","cont'
    else:
        text = (
            '{"id":"chatcmpl-sim","object":"chat.completion","created":1700000000,'
            f'"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","con'
        )
    return web.Response(body=text.encode(), content_type="application/json")


_WRONG_SHAPES_OPENAI: list[dict[str, Any]] = [
    {"id": "chatcmpl-sim", "object": "chat.completion", "choices": []},
    {"choices": [{"index": 0, "message": None, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
    {"choices": "n/a", "usage": {"prompt_tokens": "n/a"}},
]
_WRONG_SHAPES_ANTHROPIC: list[dict[str, Any]] = [
    {"type": "message", "role": "assistant", "content": None},
    {"type": "message", "role": "assistant", "content": [], "usage": None},
    {"type": "message", "role": "assistant", "content": "text where blocks belong"},
]
_wrong_shape_turn = itertools.count()


def _html(status: int, title: str) -> web.Response:
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return web.Response(status=status, text=page, content_type="text/html")


async def _hang(request: web.Request, seconds: float) -> bool:
    """Sleep up to ``seconds``; False when the client went away meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, 0.2))


async def _write_stream(
    request: web.Request, events: list[bytes], headers: dict[str, str] | None, truncate: bool
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=_merge(dict(_SSE_HEADERS), headers))
    try:
        await resp.prepare(request)
        if truncate:
            await resp.write(b"".join(events[: max(1, len(events) // 2)]))
            transport = request.transport
            if transport is not None:
                transport.close()
            return resp
        await resp.write(b"".join(events))
        await resp.write_eof()
    except ConnectionResetError:  # the client went away before or while we wrote
        return Dropped()
    return resp


async def _replay(
    sim: Simulator,
    request: web.Request,
    index: int,
    key: str,
    anthropic: bool,
    stream: bool,
    headers: dict[str, str] | None,
) -> web.StreamResponse:
    entry = sim.replay_entry(index)
    sim.stats_obj.answered(key)
    if stream:
        events = P.replay_events(entry["events"], anthropic)
        return await _write_stream(request, events, headers, truncate=False)
    return E.json_response(entry["body"], 200, headers)


def maybe_invalid(sim: Simulator, output: Output, t: Triggers, key: str, truncate: bool) -> Output:
    """``[[sim:always_bad_json]]``: always invalid; ``[[sim:bad_json]]``: invalid on the
    first answered (not truncated) attempt of this exact request."""
    if t.always_bad_json:
        sim.stats_obj.faults["bad_json"] += 1
        return output.invalid()
    if t.bad_json and not truncate:
        sim.json_attempts[key] += 1
        if sim.json_attempts[key] == 1:
            sim.stats_obj.faults["bad_json"] += 1
            return output.invalid()
    return output


async def complete(sim: Simulator, request: web.Request, anthropic: bool) -> web.StreamResponse:
    cfg = sim.config
    body = await sim.read_body(request, anthropic)
    sim.check_auth(request, body, anthropic)

    model = body.get("model") or body.get("model_id")
    if not isinstance(model, str) or not model:
        raise E.Reject(sim.invalid("you must provide a model parameter", anthropic, "model"))
    if not cfg.accept_any_model and model not in sim.models:
        if anthropic:
            raise E.Reject(E.json_response(E.anthropic_error(404, f"model: {model}"), 404))
        err = E.openai_error(
            f"The model `{model}` does not exist", "invalid_request_error", "model_not_found"
        )
        err["error"]["param"] = "model"
        raise E.Reject(E.json_response(err, 404))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise E.Reject(sim.invalid("messages: a non-empty list is required", anthropic, "messages"))
    if anthropic:
        max_tokens = _int(body.get("max_tokens"))
        if max_tokens is None or max_tokens < 1:
            raise E.Reject(sim.invalid("max_tokens: Field required", anthropic))
        msgs = normalize_messages(messages, body.get("system"))
        with_reasoning = _thinking(body) and cfg.reasoning_style != "none"
    else:
        mt = body.get("max_completion_tokens")
        max_tokens = _int(mt if mt is not None else body.get("max_tokens"))
        msgs = normalize_messages(messages)
        with_reasoning = cfg.reasoning_style != "none"
    stream = body.get("stream") is True
    triggers = parse_triggers(msgs)
    if anthropic and _thinking(body) and _forces_tool(body.get("tool_choice")):
        message = "Thinking may not be enabled when tool_choice forces tool use."
        raise E.Reject(sim.invalid(message, anthropic, "tool_choice"))
    try:
        if anthropic:
            output = anthropic_output(body, triggers)
        else:
            output = openai_output(body, msgs, triggers)
    except OutputError as exc:
        raise E.Reject(sim.invalid(str(exc), anthropic, exc.param)) from None

    if cfg.max_concurrent is not None and sim.stats_obj.in_flight > cfg.max_concurrent:
        msg = f"Rate limit exceeded. Maximum {cfg.max_concurrent} queued requests allowed."
        raise E.Reject(E.json_response(E.modelslab_error(msg, retry_after=1), 429))

    now = time.time()
    if sim.throttled(now):
        raise E.Reject(throttled(cfg.throttle_retry_after_s, model, anthropic))
    prompt = estimate_prompt_tokens(msgs)
    if cfg.context_window is not None and prompt > cfg.context_window:
        raise E.Reject(_over_window(prompt, cfg.context_window, anthropic))
    limiter = sim.limiter
    if limiter.active:
        cost = prompt + (max_tokens if max_tokens is not None else cfg.default_max_tokens)
        rej = limiter.check(cost, now)
        if rej is not None:
            hdrs = sim.limit_headers(anthropic, now)
            if limiter.style == "litellm":
                raise E.Reject(litellm_rate_limited(rej, hdrs))
            raise E.Reject(rate_limited(rej, model, anthropic, hdrs))
    headers = sim.limit_headers(anthropic, now)

    key = make_request_key(body)
    if triggers is not None:
        early = _triggered(sim, request, triggers, key, anthropic, prompt, headers)
        if early is not None:
            return early

    fault = sim.draw_fault(stream)
    if fault is not None:
        sim.stats_obj.faults[fault] += 1
        if fault == "hang":
            if not await _hang(request, cfg.hang_s):
                return Dropped()
        elif fault != "truncate_stream":
            return _fault_response(fault, request, anthropic, model)

    await sim.sleep(sim.latency_s(triggers))
    truncate = fault == "truncate_stream"
    if triggers is not None and triggers.replay is not None:
        return await _replay(sim, request, triggers.replay, key, anthropic, stream, headers)
    if output is not None and triggers is not None:
        output = maybe_invalid(sim, output, triggers, key, truncate)
    c = sim.completion_for(model, msgs, max_tokens, with_reasoning, triggers, prompt, output)
    if anthropic:
        c = sim.cached(body, model, c)
    if not truncate:
        sim.stats_obj.paid(key, c)

    chunk = cfg.stream_chunk_chars
    if stream:
        if anthropic:
            events = P.anthropic_stream_events(
                c, model, chunk, cfg.anthropic_delta_usage, cfg.thinking_details
            )
        else:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            events = P.openai_stream_events(
                c,
                model,
                cfg.reasoning_style,
                cfg.usage_style,
                include_usage,
                chunk,
                P.served_tier(body),
            )
        return await _write_stream(request, events, headers, truncate)
    if anthropic:
        payload = P.anthropic_response(c, model, cfg.thinking_details)
        return E.json_response(payload, 200, headers)
    tier = P.served_tier(body)
    payload = P.openai_response(c, model, cfg.reasoning_style, cfg.usage_style, tier)
    return E.json_response(payload, 200, headers)
