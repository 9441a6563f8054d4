"""Tests of the provider simulator over real loopback sockets."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest

from pipeline.simulator import (
    RunningSimulator,
    SimulatorConfig,
    estimate_prompt_tokens,
    expected_reasoning,
    expected_response,
    expected_structured,
    request_digest,
    request_key,
    start_in_thread,
)
from pipeline.simulator.behaviour import go_duration
from pipeline.simulator.ratelimit import QuantizedBucket, RateLimiter
from pipeline.simulator.structured import corrupt

DEFAULTS = SimulatorConfig().model_dump()
MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Summarise   this row:\n  id=1, name=Ada Lovelace, born 1815"},
]
GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?(h|ms|m|s))+$")


@pytest.fixture(scope="module")
def server() -> Iterator[RunningSimulator]:
    with start_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture
def sim(server: RunningSimulator) -> RunningSimulator:
    server.configure(**DEFAULTS)
    server.reset()
    return server


def chat(
    http: httpx.Client, sim: RunningSimulator, messages: list[dict[str, Any]] = MSGS, **body: Any
) -> httpx.Response:
    payload = {"model": "grok-3-mini", "messages": messages, **body}
    return http.post(f"{sim.base_url}/chat/completions", json=payload)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- pure functions ------------------------------------------------------------------


def test_deterministic_functions() -> None:
    digest = request_digest("m", MSGS)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    topic = "Summarise this row: id=1, name=Ada Lovelace, born 1815"
    assert expected_response("m", MSGS) == f"Answer {digest}: {topic[:80]}"
    assert expected_reasoning("m", MSGS) == f"Reasoning {digest}: the user asks about {topic[:40]}."
    assert estimate_prompt_tokens(MSGS) == (3 + math.ceil(14 / 4)) + (3 + 15) + 3
    assert request_key({"a": 1, "key": "secret"}) == request_key({"a": 1})
    assert request_digest("m", MSGS) != request_digest("n", MSGS)


def test_go_duration() -> None:
    assert go_duration(0.02) == "20ms"
    assert go_duration(1) == "1s"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(179.56) == "2m59.56s"
    assert go_duration(3723) == "1h2m3s"
    for v in (0.0005, 0.3, 7.66, 59.9999, 61, 4000):
        assert GO_DURATION.match(go_duration(v)), go_duration(v)


def test_bucket_second_window_is_exact_in_the_long_run() -> None:
    # 100 RPM quantized per second = 1.67 per second: 100 admitted over 60 s of polling
    b = QuantizedBucket(100, 1.0, now=0.0)
    admitted = 0
    for i in range(6000):
        now = i * 0.01
        b.refill(now)
        if b.admits(1):
            b.consume(1)
            admitted += 1
    assert 99 <= admitted <= 101
    lim = RateLimiter(None, 6000, "second", now=0.5)  # 100 tokens per second
    assert lim.check(1000, 0.5) is None  # oversized request admitted on a full bucket
    rej = lim.check(10, 0.6)
    assert rej is not None and rej.kind == "tokens" and rej.retry_after_s == pytest.approx(9.4)


def test_bucket_minute_window_is_strict() -> None:
    lim = RateLimiter(None, 1000, "minute", now=0.0)
    assert lim.check(600, 1.0) is None
    rej = lim.check(500, 2.0)
    assert rej is not None and rej.used == 600 and rej.requested == 500
    assert rej.retry_after_s == pytest.approx(58.0)
    assert lim.check(400, 3.0) is None  # rejection consumed nothing
    assert lim.check(500, 60.5) is None


def test_config_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("rpm: 600\nlatency_ms: [5, 10]\nreasoning_style: think\n")
    cfg = SimulatorConfig.from_yaml(path)
    assert cfg.rpm == 600 and cfg.latency_ms == (5, 10) and cfg.reasoning_style == "think"
    path.write_text("bogus: 1\n")
    with pytest.raises(ValueError):
        SimulatorConfig.from_yaml(path)
    with pytest.raises(ValueError):
        SimulatorConfig(fail_500=0.7, fail_503=0.7)


# --- OpenAI chat completions ----------------------------------------------------------


@pytest.mark.parametrize("usage_style", ["xai", "openai"])
def test_openai_shape_and_usage(
    http: httpx.Client, sim: RunningSimulator, usage_style: str
) -> None:
    sim.configure(usage_style=usage_style, cached_fraction=0.5)
    r = chat(http, sim, max_tokens=500)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "grok-3-mini" and isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    msg = choice["message"]
    answer = expected_response("grok-3-mini", MSGS)
    reasoning = expected_reasoning("grok-3-mini", MSGS)
    assert msg == {
        "role": "assistant",
        "content": answer,
        "refusal": None,
        "reasoning_content": reasoning,
    }
    u = data["usage"]
    prompt = estimate_prompt_tokens(MSGS)
    comp, reas = math.ceil(len(answer) / 4), math.ceil(len(reasoning) / 4)
    assert u["prompt_tokens"] == prompt
    assert u["prompt_tokens_details"]["cached_tokens"] == prompt // 2
    assert u["completion_tokens_details"]["reasoning_tokens"] == reas
    assert u["total_tokens"] == prompt + comp + reas
    if usage_style == "xai":
        assert u["completion_tokens"] == comp
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] + reas
    else:
        assert u["completion_tokens"] == comp + reas
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


@pytest.mark.parametrize("style", ["reasoning_content", "reasoning", "think", "none"])
def test_reasoning_styles(http: httpx.Client, sim: RunningSimulator, style: str) -> None:
    sim.configure(reasoning_style=style)
    data = chat(http, sim).json()
    msg = data["choices"][0]["message"]
    answer = expected_response("grok-3-mini", MSGS)
    reasoning = expected_reasoning("grok-3-mini", MSGS)
    reas_tokens = data["usage"]["completion_tokens_details"]["reasoning_tokens"]
    if style in ("reasoning_content", "reasoning"):
        assert msg[style] == reasoning and msg["content"] == answer
    elif style == "think":
        assert msg["content"] == f"<think>{reasoning}</think>{answer}"
    else:
        assert msg["content"] == answer and reas_tokens == 0
    assert ("reasoning_content" in msg) == (style == "reasoning_content")
    assert ("reasoning" in msg) == (style == "reasoning")


def test_max_tokens_truncates(http: httpx.Client, sim: RunningSimulator) -> None:
    data = chat(http, sim, max_completion_tokens=3).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == expected_response("grok-3-mini", MSGS)[:12]
    assert data["usage"]["completion_tokens"] == 3


def test_auth(http: httpx.Client, sim: RunningSimulator) -> None:
    key = "sk-simulated-secret-key"
    sim.configure(api_key=key)
    url = f"{sim.base_url}/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": user("hi")}
    assert http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert http.post(url, json=body, headers={"x-api-key": key}).status_code == 200
    assert http.post(url, json={**body, "key": key}).status_code == 200
    wrong = {"Authorization": "Bearer abcdefghijklmnopxyz"}
    r = http.post(url, json=body, headers=wrong)
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": "Incorrect API key provided: ab***yz.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert http.post(url, json=body).status_code == 401
    sim.configure(auth_error_style="xai")
    r = http.post(url, json=body, headers=wrong)
    assert r.status_code == 400
    assert r.json()["code"] == "Client specified an invalid argument"
    assert r.json()["error"].startswith("Incorrect API key provided: ab***yz.")
    sim.configure(auth_error_style="modelslab")
    r = http.post(url, json={**body, "key": "abcdefghijklmnopxyz"})
    assert (r.status_code, r.json()) == (401, {"status": "error", "message": "Invalid API key"})
    assert "abcdefghijklmnopxyz" not in r.text
    assert http.get(f"{sim.base_url}/models").status_code == 401
    assert sim.stats()["completions"] == 3


def test_unknown_model(http: httpx.Client, sim: RunningSimulator) -> None:
    r = http.post(
        f"{sim.base_url}/chat/completions", json={"model": "nope-1", "messages": user("hi")}
    )
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `nope-1` does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    sim.configure(accept_any_model=True)
    r = http.post(
        f"{sim.base_url}/chat/completions", json={"model": "nope-1", "messages": user("hi")}
    )
    assert r.status_code == 200 and r.json()["model"] == "nope-1"


def test_modelslab_body_key_and_model_id(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(api_key="ml-key-123456")
    body = {
        "model_id": "x-ai-grok-3-mini",
        "key": "ml-key-123456",
        "messages": user("hello there"),
        "max_tokens": 1000,
    }
    r = http.post(f"{sim.url}/api/v7/llm/chat/completions", json=body)
    assert r.status_code == 200
    data = r.json()
    assert data["model"] == "x-ai-grok-3-mini"
    expected = expected_response("x-ai-grok-3-mini", user("hello there"))
    assert data["choices"][0]["message"]["content"] == expected
    assert http.post(f"{sim.url}/chat/completions", json=body).status_code == 200


# --- limits -----------------------------------------------------------------------------


def test_rpm_second_window(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(rpm=120, tpm=1_000_000)  # 2 requests per wall-clock second
    # start right after a second boundary so the burst stays inside one window
    time.sleep(1.02 - time.time() % 1.0)
    statuses = [chat(http, sim, messages=user(f"row {i}"), max_tokens=10) for i in range(4)]
    ok = [r for r in statuses if r.status_code == 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert len(ok) == 2 and len(limited) == 2
    h = ok[0].headers
    assert h["x-ratelimit-limit-requests"] == "120"
    assert h["x-ratelimit-limit-tokens"] == "1000000"
    assert int(h["x-ratelimit-remaining-requests"]) == 119
    assert GO_DURATION.match(h["x-ratelimit-reset-requests"])
    assert GO_DURATION.match(h["x-ratelimit-reset-tokens"])
    r = limited[0]
    err = r.json()["error"]
    assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
    assert err["param"] is None
    assert "on requests per min (RPM): Limit 120, Used 2, Requested 1." in err["message"]
    assert err["message"].startswith("Rate limit reached for grok-3-mini")
    assert r.headers["retry-after"] == "1"
    assert 0 < int(r.headers["retry-after-ms"]) <= 1000
    assert "x-ratelimit-remaining-tokens" in r.headers
    stats = sim.stats()
    assert stats["rate_limited"] == 2 and stats["completions"] == 2
    time.sleep(float(r.headers["retry-after-ms"]) / 1000 + 0.02)
    assert chat(http, sim, max_tokens=10).status_code == 200


def test_tpm_limit(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(tpm=600, limit_window="minute")
    assert chat(http, sim, max_tokens=400).status_code == 200
    r = chat(http, sim, max_tokens=400)
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert "tokens per min (TPM): Limit 600" in r.json()["error"]["message"]
    assert chat(http, sim, max_tokens=10).status_code == 200  # the 429 cost nothing


def test_max_concurrent(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(max_concurrent=2)

    def one(i: int) -> httpx.Response:
        return chat(http, sim, messages=user(f"slow row {i} [[sim:slow=400]]"))

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    limited = [r for r in results if r.status_code == 429]
    assert len([r for r in results if r.status_code == 200]) == 2 and len(limited) == 3
    assert limited[0].json() == {
        "status": "error",
        "message": "Rate limit exceeded. Maximum 2 queued requests allowed.",
        "retry_after": 1,
    }
    assert "retry-after" not in limited[0].headers
    assert sim.stats()["max_in_flight"] >= 3


# --- triggers and faults ------------------------------------------------------------------


def test_fail_first_and_drop_first(http: httpx.Client, sim: RunningSimulator) -> None:
    msgs = user("flaky row [[sim:fail_first=2]]")
    assert chat(http, sim, messages=msgs).status_code == 503
    assert chat(http, sim, messages=msgs).status_code == 503
    r = chat(http, sim, messages=msgs)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == expected_response("grok-3-mini", msgs)
    msgs = user("dropping row [[sim:drop_first=1]]")
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http, sim, messages=msgs)
    assert chat(http, sim, messages=msgs).status_code == 200
    s = sim.stats()
    assert s["faults"] == {"fail_first": 2, "drop_first": 1}
    assert s["completions"] == 2 and s["requests"] == 5 and s["by_status"][0] == 1


@pytest.mark.parametrize(
    ("trigger", "status", "check"),
    [
        ("[[sim:status=400]]", 400, lambda b: b["error"]["code"] == "invalid_request"),
        ("[[sim:status=401]]", 401, lambda b: b["error"]["code"] == "invalid_api_key"),
        ("[[sim:status=402]]", 402, lambda b: b["message"].startswith("Insufficient credits")),
        ("[[sim:status=500]]", 500, lambda b: b["error"]["type"] == "server_error"),
        ("[[sim:quota]]", 429, lambda b: b["error"]["code"] == "insufficient_quota"),
        ("[[sim:context]]", 400, lambda b: b["error"]["code"] == "context_length_exceeded"),
    ],
)
def test_status_triggers(
    http: httpx.Client, sim: RunningSimulator, trigger: str, status: int, check: Any
) -> None:
    r = chat(http, sim, messages=user(f"x {trigger}"))
    assert r.status_code == status and check(r.json())
    assert sim.stats()["completions"] == 0


def test_filter_and_length_triggers(http: httpx.Client, sim: RunningSimulator) -> None:
    choice = chat(http, sim, messages=user("bad [[sim:filter]]")).json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == ""
    msgs = user("long [[sim:length]]")
    choice = chat(http, sim, messages=msgs).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert expected_response("grok-3-mini", msgs).startswith(choice["message"]["content"])


def test_random_faults(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(fail_529=1.0)
    assert chat(http, sim).status_code == 529
    sim.configure(fail_529=0.0, malformed=1.0)
    r = chat(http, sim)
    assert r.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)
    sim.configure(malformed=0.0, status_error_200=1.0)
    r = chat(http, sim)
    assert (r.status_code, r.json()["status"]) == (200, "error")
    sim.configure(status_error_200=0.0, drop_connection=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http, sim)
    sim.configure(drop_connection=0.0, truncate_stream=1.0)
    assert chat(http, sim).status_code == 200  # no stream: nothing to truncate
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http, sim, stream=True).read()
    sim.configure(truncate_stream=0.0, hang=1.0, hang_s=0.3)
    t0 = time.monotonic()
    assert chat(http, sim).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    s = sim.stats()
    assert s["completions"] == 2  # the non-streamed truncate_stream draw and the hang
    assert s["faults"] == {
        "fail_529": 1,
        "malformed": 1,
        "status_error_200": 1,
        "drop_connection": 1,
        "truncate_stream": 1,
        "hang": 1,
    }


# --- streaming --------------------------------------------------------------------------


def parse_sse(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


@pytest.mark.parametrize("style", ["reasoning_content", "reasoning", "think"])
def test_stream_reassembles(http: httpx.Client, sim: RunningSimulator, style: str) -> None:
    sim.configure(reasoning_style=style, usage_style="openai", cached_fraction=0.25)
    plain = chat(http, sim).json()
    r = chat(http, sim, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    reasoning = "".join(c["choices"][0]["delta"].get(style) or "" for c in chunks[:-1])
    msg = plain["choices"][0]["message"]
    assert content == msg["content"]
    if style != "think":
        assert reasoning == msg[style]
    r = chat(http, sim, stream=True)
    assert all("usage" not in c for c in parse_sse(r.text)[:-1])


# --- Anthropic ----------------------------------------------------------------------------


def test_anthropic_messages(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(api_key="ant-key-0001")
    headers = {"x-api-key": "ant-key-0001", "anthropic-version": "2023-06-01"}
    system, msgs = MSGS[0]["content"], MSGS[1:]
    body = {"model": "sim-model", "system": system, "messages": msgs, "max_tokens": 2048}
    r = http.post(f"{sim.url}/v1/messages", json=body, headers=headers)
    assert r.status_code == 200
    data = r.json()
    answer = expected_response("sim-model", MSGS)
    assert data["type"] == "message" and data["role"] == "assistant"
    assert data["content"] == [{"type": "text", "text": answer}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    prompt = estimate_prompt_tokens(MSGS)
    assert data["usage"] == {
        "input_tokens": prompt,
        "output_tokens": math.ceil(len(answer) / 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }
    thinking = {**body, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    data = http.post(f"{sim.url}/v1/messages", json=thinking, headers=headers).json()
    reasoning = expected_reasoning("sim-model", MSGS)
    assert data["content"][0] == {"type": "thinking", "thinking": reasoning, "signature": "sig"}
    assert data["content"][1] == {"type": "text", "text": answer}
    streamed = http.post(
        f"{sim.url}/v1/messages", json={**thinking, "stream": True}, headers=headers
    )
    events = parse_sse(streamed.text)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == reasoning
    assert "".join(d.get("text", "") for d in deltas) == answer
    assert events[-2]["usage"]["output_tokens"] == data["usage"]["output_tokens"]

    count = {"model": "sim-model", "system": system, "messages": msgs}
    r = http.post(f"{sim.url}/v1/messages/count_tokens", json=count, headers=headers)
    assert r.json() == {"input_tokens": prompt}
    r = http.post(f"{sim.url}/v1/messages", json={**body, "max_tokens": None}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post(f"{sim.url}/v1/messages", json=body, headers={"x-api-key": "bad-key-0002"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    models = http.get(f"{sim.url}/v1/models", headers=headers).json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == set(DEFAULTS["models"])
    assert all(m["object"] == "model" and m["owned_by"] == "simulator" for m in models["data"])
    # same prompt, same digest across protocols
    assert request_digest("sim-model", MSGS) in answer


def test_anthropic_errors_and_headers(http: httpx.Client, sim: RunningSimulator) -> None:
    body = {"model": "sim-model", "messages": user("x [[sim:status=529]]"), "max_tokens": 10}
    r = http.post(f"{sim.url}/v1/messages", json=body)
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    assert r.json()["type"] == "error" and r.json()["request_id"].startswith("req_")
    sim.configure(rpm=60, limit_window="minute")
    body["messages"] = user("fine")
    r = http.post(f"{sim.url}/messages", json=body)
    assert r.status_code == 200
    assert r.headers["anthropic-ratelimit-requests-limit"] == "60"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "59"
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r.headers["anthropic-ratelimit-requests-reset"]
    )


# --- stats and control ----------------------------------------------------------------------


def test_stats_duplicate_paid(http: httpx.Client, sim: RunningSimulator) -> None:
    for text in ("row a", "row b", "row a", "row a"):
        assert chat(http, sim, messages=user(text)).status_code == 200
    s = sim.stats()
    assert s["requests"] == 4 and s["completions"] == 4
    assert s["duplicate_paid"] == 2 and s["distinct_paid"] == 2
    assert sorted(s["paid_by_digest"].values()) == [1, 3]
    assert s["by_status"] == {200: 4}
    assert s["first_request_at"] <= s["last_request_at"]
    over_http = http.get(f"{sim.url}/_sim/stats").json()
    assert "paid_by_digest" not in over_http and over_http["duplicate_paid"] == 2
    assert over_http["by_status"] == {"200": 4}
    assert len(http.get(f"{sim.url}/_sim/stats?full=1").json()["paid_by_digest"]) == 2
    assert http.post(f"{sim.url}/_sim/reset").status_code == 200
    assert sim.stats()["requests"] == 0
    assert http.get(f"{sim.url}/_sim/health").status_code == 200


def test_python_m_serve(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("models: [only-model]\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.simulator", "--port", "0", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert m, line
        with httpx.Client() as client:
            models = client.get(f"{m.group(1)}/v1/models").json()
        assert [d["id"] for d in models["data"]] == ["only-model"]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# --- structured output and tool calls ------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0.5, "maximum": 0.75},
        "weight": {"type": "number"},
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "flag": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
        "note": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "born": {"type": "integer", "minimum": 1800, "maximum": 1900},
                "kind": {"enum": ["human", "machine"]},
            },
            "required": ["name", "born", "kind"],
            "additionalProperties": False,
        },
        "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}},
    },
    "required": ["label", "score", "count", "tags", "author", "lines"],
    "additionalProperties": False,
    "$defs": {
        "Line": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        }
    },
}
OTHER: dict[str, Any] = {
    "type": "object",
    "properties": {"mood": {"enum": ["calm", "angry"]}, "level": {"type": "integer"}},
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "row", "schema": SCHEMA, "strict": True},
}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": n, "description": n, "parameters": s}}
    for n, s in (("classify", SCHEMA), ("other", OTHER))
]
ANTHROPIC_TOOLS = [
    {"name": n, "description": n, "input_schema": s}
    for n, s in (("classify", SCHEMA), ("other", OTHER))
]


def is_valid(obj: Any, schema: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).is_valid(obj)


def test_expected_structured_is_valid_and_deterministic() -> None:
    digest = request_digest("m", MSGS)
    obj = expected_structured("m", MSGS, SCHEMA)
    assert obj == expected_structured("m", MSGS, SCHEMA)
    assert is_valid(obj, SCHEMA)
    assert list(obj) == list(SCHEMA["properties"])  # optional properties too
    assert obj["note"] == f"note-{digest[:6]}"
    assert len(obj["tags"]) == 2 and len(obj["lines"]) == 2
    assert round(obj["weight"], 3) == obj["weight"] and 0 <= obj["weight"] < 1
    assert date.fromisoformat(obj["when"])
    seen = set()
    for i in range(60):
        o = expected_structured("m", user(f"row {i}"), SCHEMA)
        assert is_valid(o, SCHEMA), o
        seen.add((o["label"], o["count"], o["author"]["kind"]))
    assert len(seen) > 10
    # bounds, exclusive bounds, anyOf, allOf, const and the degenerate cases
    tricky = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
            "b": {"type": "number", "exclusiveMaximum": -3},
            "c": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 7}]},
            "d": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"x": {"const": 1}}}]},
            "e": {"type": "string", "minLength": 30, "maxLength": 31},
            "f": {"type": "array", "items": {"type": "integer"}, "minItems": 3},
            "g": {"type": "null"},
        },
        "$defs": {"Base": {"properties": {"sku": {"type": "string"}}, "required": ["sku"]}},
    }
    for i in range(30):
        o = expected_structured("m", user(f"tricky {i}"), tricky)
        assert is_valid(o, tricky), o
        assert o["a"] == 1 and o["d"]["x"] == 1 and len(o["f"]) == 3


@pytest.mark.parametrize(
    "schema",
    [
        SCHEMA,
        OTHER,
        {"type": "object", "properties": {"n": {"type": "integer"}}},
        {"type": "object", "additionalProperties": False},
    ],
)
def test_corrupt_is_invalid(schema: dict[str, Any]) -> None:
    obj = expected_structured("m", MSGS, schema)
    assert is_valid(obj, schema) and not is_valid(corrupt(obj, schema), schema)


def stream_message(text: str) -> dict[str, Any]:
    """Reassemble a streamed Chat Completions answer into a non-streamed message."""
    chunks = [e for e in parse_sse(text) if e != "[DONE]" and e["choices"]]
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    reasoning = ""
    for c in chunks:
        delta = c["choices"][0]["delta"]
        if delta.get("content") is not None:
            content = (content or "") + delta["content"]
        reasoning += delta.get("reasoning_content") or ""
        for tc in delta.get("tool_calls", []):
            if "id" in tc:
                assert tc["function"]["arguments"] == ""
                calls[tc["index"]] = {k: tc[k] for k in ("id", "type")} | {
                    "function": dict(tc["function"])
                }
            else:
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    msg["finish_reason"] = chunks[-1]["choices"][0]["finish_reason"]
    return msg


def test_openai_json_schema(http: httpx.Client, sim: RunningSimulator) -> None:
    data = chat(http, sim, response_format=RESPONSE_FORMAT).json()
    msg = data["choices"][0]["message"]
    expected = expected_structured("grok-3-mini", MSGS, SCHEMA)
    assert msg["content"] == orjson.dumps(expected).decode()
    assert is_valid(orjson.loads(msg["content"]), SCHEMA)
    assert msg["reasoning_content"] == expected_reasoning("grok-3-mini", MSGS)
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == math.ceil(len(msg["content"]) / 4)
    r = chat(
        http,
        sim,
        response_format=RESPONSE_FORMAT,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = stream_message(r.text)
    assert streamed.pop("finish_reason") == "stop" and streamed == msg
    assert parse_sse(r.text)[-2]["usage"] == data["usage"]


def test_openai_json_object(http: httpx.Client, sim: RunningSimulator) -> None:
    fmt = {"type": "json_object"}
    data = chat(http, sim, response_format=fmt).json()
    answer = {"answer": expected_response("grok-3-mini", MSGS)}
    assert data["choices"][0]["message"]["content"] == orjson.dumps(answer).decode()
    for hint in (orjson.dumps(OTHER).decode(), json.dumps(SCHEMA, indent=2)):
        msgs = [
            {"role": "system", "content": f"Be terse.\nJSON Schema: {hint}\nReply with JSON."},
            *user("classify this"),
        ]
        schema = orjson.loads(hint)
        content = chat(http, sim, msgs, response_format=fmt).json()["choices"][0]["message"][
            "content"
        ]
        assert orjson.loads(content) == expected_structured("grok-3-mini", msgs, schema)
        assert is_valid(orjson.loads(content), schema)
        r = chat(http, sim, msgs, response_format=fmt, stream=True)
        assert stream_message(r.text)["content"] == content


@pytest.mark.parametrize(
    ("choice", "text", "tool"),
    [
        ("required", "classify row", "classify"),
        ({"type": "function", "function": {"name": "other"}}, "row", "other"),
        ("auto", "row [[sim:tool]]", "classify"),
        (None, "row [[sim:tool]]", "classify"),
        ("auto", "row", None),
        ("none", "row [[sim:tool]]", None),
    ],
)
def test_openai_tool_calls(
    http: httpx.Client, sim: RunningSimulator, choice: Any, text: str, tool: str | None
) -> None:
    msgs = user(text)
    extra = {} if choice is None else {"tool_choice": choice}
    data = chat(http, sim, msgs, tools=OPENAI_TOOLS, **extra).json()
    msg = data["choices"][0]["message"]
    if tool is None:
        assert msg["content"] == expected_response("grok-3-mini", msgs)
        assert "tool_calls" not in msg and data["choices"][0]["finish_reason"] == "stop"
        return
    schema = SCHEMA if tool == "classify" else OTHER
    args = orjson.dumps(expected_structured("grok-3-mini", msgs, schema)).decode()
    assert msg["content"] is None
    assert msg["tool_calls"] == [
        {
            "id": f"call_{request_digest('grok-3-mini', msgs)}",
            "type": "function",
            "function": {"name": tool, "arguments": args},
        }
    ]
    assert is_valid(orjson.loads(args), schema)
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert data["usage"]["completion_tokens"] == math.ceil(len(args) / 4)
    r = chat(http, sim, msgs, tools=OPENAI_TOOLS, stream=True, **extra)
    streamed = stream_message(r.text)
    assert streamed.pop("finish_reason") == "tool_calls" and streamed == msg


def test_tool_choice_errors(http: httpx.Client, sim: RunningSimulator) -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    r = chat(http, sim, tools=OPENAI_TOOLS, tool_choice=named)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert chat(http, sim, tool_choice="required").status_code == 400
    body = {"model": "sim-model", "messages": MSGS[1:], "max_tokens": 100}
    choice = {"type": "tool", "name": "nope"}
    r = http.post(
        f"{sim.url}/v1/messages", json={**body, "tools": ANTHROPIC_TOOLS, "tool_choice": choice}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert sim.stats()["completions"] == 0


def anthropic_stream_message(text: str) -> dict[str, Any]:
    """Reassemble a streamed Anthropic answer (content blocks and stop_reason)."""
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    stop = None
    for e in parse_sse(text):
        if e["type"] == "content_block_start":
            blocks.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], blocks[e["index"]]
            if d["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
            elif d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                b["signature"] += d["signature"]
        elif e["type"] == "content_block_stop" and e["index"] in partial:
            assert blocks[e["index"]]["input"] == {}
            blocks[e["index"]]["input"] = orjson.loads(partial[e["index"]])
        elif e["type"] == "message_delta":
            stop = e["delta"]["stop_reason"]
    return {"content": blocks, "stop_reason": stop}


@pytest.mark.parametrize(
    ("choice", "text", "tool"),
    [
        ({"type": "tool", "name": "other"}, "row", "other"),
        ({"type": "any"}, "row", "classify"),
        ({"type": "auto"}, "row [[sim:tool]]", "classify"),
        (None, "row [[sim:tool]]", "classify"),
        (None, "row", None),
    ],
)
def test_anthropic_tool_use(
    http: httpx.Client, sim: RunningSimulator, choice: Any, text: str, tool: str | None
) -> None:
    body: dict[str, Any] = {
        "model": "sim-model",
        "system": "You are terse.",
        "messages": user(text),
        "max_tokens": 4096,
        "tools": ANTHROPIC_TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    if choice is not None:
        body["tool_choice"] = choice
    msgs = [{"role": "system", "content": "You are terse."}, *user(text)]
    answer = http.post(f"{sim.url}/v1/messages", json=body)
    if isinstance(choice, dict) and choice["type"] in ("tool", "any"):
        # Anthropic rejects a forced tool call while thinking is on.
        assert answer.status_code == 400
        assert "tool_choice forces tool use" in answer.json()["error"]["message"]
        return
    data = answer.json()
    reasoning = expected_reasoning("sim-model", msgs)
    assert data["content"][0] == {"type": "thinking", "thinking": reasoning, "signature": "sig"}
    if tool is None:
        assert data["content"][1] == {"type": "text", "text": expected_response("sim-model", msgs)}
        assert data["stop_reason"] == "end_turn"
        return
    schema = SCHEMA if tool == "classify" else OTHER
    expected = expected_structured("sim-model", msgs, schema)
    assert data["content"][1] == {
        "type": "tool_use",
        "id": f"toolu_{request_digest('sim-model', msgs)}",
        "name": tool,
        "input": expected,
    }
    assert is_valid(data["content"][1]["input"], schema) and len(data["content"]) == 2
    assert data["stop_reason"] == "tool_use"
    out = math.ceil(len(orjson.dumps(expected)) / 4) + math.ceil(len(reasoning) / 4)
    assert data["usage"]["output_tokens"] == out
    r = http.post(f"{sim.url}/v1/messages", json={**body, "stream": True})
    events = parse_sse(r.text)
    start = next(e for e in events if e["type"] == "content_block_start" and e["index"] == 1)
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert events[-2]["usage"]["output_tokens"] == out
    assert anthropic_stream_message(r.text) == {
        "content": data["content"],
        "stop_reason": "tool_use",
    }


def test_bad_json_json_modes(http: httpx.Client, sim: RunningSimulator) -> None:
    for fmt in (RESPONSE_FORMAT, {"type": "json_object"}):
        msgs = user(f"row {fmt['type']} [[sim:bad_json]]")
        first = chat(http, sim, msgs, response_format=fmt).json()
        content = first["choices"][0]["message"]["content"]
        assert content.startswith('{"oops": ')
        assert first["usage"]["completion_tokens"] == math.ceil(len(content) / 4)
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(content)
        for _ in range(2):
            again = chat(http, sim, msgs, response_format=fmt).json()
            obj = orjson.loads(again["choices"][0]["message"]["content"])
            if fmt["type"] == "json_schema":
                assert obj == expected_structured("grok-3-mini", msgs, SCHEMA)
            else:
                assert obj == {"answer": expected_response("grok-3-mini", msgs)}
    msgs = user("row [[sim:always_bad_json]]")
    for stream in (False, True, False):
        r = chat(http, sim, msgs, response_format=RESPONSE_FORMAT, stream=stream)
        content = (
            stream_message(r.text)["content"]
            if stream
            else r.json()["choices"][0]["message"]["content"]
        )
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(content)
    s = sim.stats()
    assert s["completions"] == 9 and s["faults"] == {"bad_json": 5}
    # fail_first comes before: 503, then the invalid answer, then the valid one
    msgs = user("row [[sim:fail_first=1]] [[sim:bad_json]]")
    assert chat(http, sim, msgs, response_format=RESPONSE_FORMAT).status_code == 503
    r = chat(http, sim, msgs, response_format=RESPONSE_FORMAT)
    assert r.json()["choices"][0]["message"]["content"].startswith('{"oops": ')
    r = chat(http, sim, msgs, response_format=RESPONSE_FORMAT)
    assert is_valid(orjson.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_bad_json_tool_calls(http: httpx.Client, sim: RunningSimulator, stream: bool) -> None:
    msgs = user("row [[sim:bad_json]]")

    def openai_args() -> Any:
        r = chat(http, sim, msgs, tools=OPENAI_TOOLS, tool_choice="required", stream=stream)
        msg = stream_message(r.text) if stream else r.json()["choices"][0]["message"]
        return orjson.loads(msg["tool_calls"][0]["function"]["arguments"])

    assert not is_valid(openai_args(), SCHEMA)
    assert openai_args() == expected_structured("grok-3-mini", msgs, SCHEMA)

    body = {
        "model": "sim-model",
        "messages": msgs,
        "max_tokens": 100,
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "tool", "name": "other"},
        "stream": stream,
    }

    def anthropic_input(text: str) -> Any:
        body["messages"] = user(text)
        r = http.post(f"{sim.url}/v1/messages", json=body)
        data = anthropic_stream_message(r.text) if stream else r.json()
        assert data["stop_reason"] == "tool_use"
        return data["content"][0]["input"]

    bad = anthropic_input("row [[sim:bad_json]]")
    assert bad["mood"] == "__not_in_enum__" and not is_valid(bad, OTHER)
    assert is_valid(anthropic_input("row [[sim:bad_json]]"), OTHER)
    for _ in range(2):
        assert not is_valid(anthropic_input("row [[sim:always_bad_json]]"), OTHER)
    assert sim.stats()["completions"] == 6


def test_litellm_style_limiter(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(rpm=2, limiter_style="litellm")
    first, second, third = (chat(http, sim, max_tokens=10) for _ in range(3))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-model_per_key-limit-requests"] == "2"
    assert second.headers["x-ratelimit-model_per_key-remaining-requests"] == "0"
    assert "x-ratelimit-limit-requests" not in first.headers
    assert third.status_code == 429
    assert third.headers["retry-after"] == "60"
    assert third.json()["error"]["code"] == "429"


def test_remaining_reported_from_the_enforcement_window(
    http: httpx.Client, sim: RunningSimulator
) -> None:
    sim.configure(rpm=600, report_window=True)  # 10 a second
    time.sleep(1.02 - time.time() % 1.0)
    r = chat(http, sim, max_tokens=10)
    assert r.headers["x-ratelimit-limit-requests"] == "600"
    assert int(r.headers["x-ratelimit-remaining-requests"]) == 9
    sim.configure(report_window=False)


def test_a_continuously_refilled_minute_bucket(http: httpx.Client, sim: RunningSimulator) -> None:
    sim.configure(rpm=3, limit_window="bucket")
    statuses = [chat(http, sim, max_tokens=10) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    limited = statuses[3]
    # One request refills in 20 s; the bucket is full again in a minute.
    assert 15 <= float(limited.headers["retry-after-ms"]) / 1000 <= 20
    assert statuses[2].headers["x-ratelimit-remaining-requests"] == "0"
