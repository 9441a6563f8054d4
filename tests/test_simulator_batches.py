"""The simulator's batch endpoints, spoken to directly as a client would."""

from __future__ import annotations

from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from pipeline.simulator import RunningSimulator, expected_response

MODEL = "x-ai-grok-3-mini"
HEADERS = {"authorization": "Bearer sk-test-4f9c2d1e8b7a6350"}
ANTHROPIC = {"x-api-key": "sk-test-4f9c2d1e8b7a6350", "anthropic-version": "2023-06-01"}


def body(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 50}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


async def upload(session: aiohttp.ClientSession, base: str, content: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="in.jsonl", content_type="application/jsonl")
    async with session.post(f"{base}/files", data=form, headers=HEADERS) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["id"])


async def call(
    session: aiohttp.ClientSession, method: str, url: str, payload: Any = None, headers: Any = None
) -> tuple[int, Any]:
    async with session.request(method, url, json=payload, headers=headers or HEADERS) as response:
        return response.status, await response.json(content_type=None)


async def lines_of(session: aiohttp.ClientSession, url: str, headers: Any = None) -> list[Any]:
    async with session.get(url, headers=headers or HEADERS) as response:
        assert response.status == 200
        return [orjson.loads(line) for line in (await response.read()).splitlines() if line]


def test_openai_batch_lifecycle_output_and_error_files(simulator: RunningSimulator) -> None:
    simulator.configure(batch_turnaround_s=0.0, batch_fail_rate=0.3, seed=3)
    base = simulator.base_url
    requests = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body(f"q{i}"),
        }
        for i in range(40)
    ]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            file_id = await upload(session, base, jsonl(requests))
            create = {
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"job": "a"},
            }
            status, batch = await call(session, "POST", f"{base}/batches", create)
            assert status == 200 and batch["status"] == "validating"
            status, batch = await call(session, "GET", f"{base}/batches/{batch['id']}")
            assert batch["status"] == "completed"
            counts = batch["request_counts"]
            assert counts["total"] == 40 and counts["completed"] + counts["failed"] == 40
            assert 0 < counts["failed"] < 40
            outputs = await lines_of(session, f"{base}/files/{batch['output_file_id']}/content")
            errors = await lines_of(session, f"{base}/files/{batch['error_file_id']}/content")
            assert len(outputs) == counts["completed"] and len(errors) == counts["failed"]
            for line in outputs:
                answer = line["response"]["body"]["choices"][0]["message"]["content"]
                prompt = f"q{line['custom_id'][1:]}"
                messages = [{"role": "user", "content": prompt}]
                assert answer == expected_response(MODEL, messages)
            assert all(line["response"]["status_code"] == 500 for line in errors)

    anyio.run(scenario)
    assert simulator.stats()["requests"] == 0
    assert simulator.stats()["batches_created"] == 1


def test_openai_batches_list_newest_first_with_after_and_limit(
    simulator: RunningSimulator,
) -> None:
    simulator.configure(batch_turnaround_s=3600)
    base = simulator.base_url
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body("x")}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            file_id = await upload(session, base, jsonl([line]))
            ids = []
            for n in range(5):
                create = {
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    "metadata": {"n": str(n)},
                }
                ids.append((await call(session, "POST", f"{base}/batches", create))[1]["id"])
            _, first = await call(session, "GET", f"{base}/batches?limit=2")
            assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
            _, rest = await call(
                session, "GET", f"{base}/batches?limit=10&after={first['last_id']}"
            )
            assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
            _, cancelled = await call(session, "POST", f"{base}/batches/{ids[0]}/cancel")
            assert cancelled["status"] == "cancelling"
            _, later = await call(session, "GET", f"{base}/batches/{ids[0]}")
            assert later["status"] == "cancelled"

    anyio.run(scenario)


@pytest.mark.parametrize("bad", ["not json", '{"custom_id": "a", "method": "GET"}'])
def test_openai_batch_with_invalid_lines_fails_validation(
    simulator: RunningSimulator, bad: str
) -> None:
    base = simulator.base_url
    good = {"custom_id": "g", "method": "POST", "url": "/v1/chat/completions", "body": body("x")}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            file_id = await upload(session, base, jsonl([good]) + bad.encode() + b"\n")
            create = {
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
            _, batch = await call(session, "POST", f"{base}/batches", create)
            _, batch = await call(session, "GET", f"{base}/batches/{batch['id']}")
            assert batch["status"] == "failed"
            assert batch["errors"]["data"][0]["line"] == 2

    anyio.run(scenario)


def test_anthropic_message_batch_results_and_expiry(simulator: RunningSimulator) -> None:
    simulator.configure(batch_turnaround_s=0.0, batch_expire_rate=0.25, seed=5)
    base = f"{simulator.url}/v1/messages/batches"
    requests = [{"custom_id": f"q_{i}", "params": body(f"q{i}")} for i in range(40)]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            status, bad = await call(
                session,
                "POST",
                base,
                {"requests": [{"custom_id": "no spaces", "params": {}}]},
                ANTHROPIC,
            )
            assert status == 400 and bad["error"]["type"] == "invalid_request_error"
            status, batch = await call(session, "POST", base, {"requests": requests}, ANTHROPIC)
            assert status == 200 and batch["processing_status"] == "in_progress"
            _, batch = await call(session, "GET", f"{base}/{batch['id']}", None, ANTHROPIC)
            assert batch["processing_status"] == "ended"
            counts = batch["request_counts"]
            assert counts["succeeded"] + counts["expired"] == 40 and counts["expired"] > 0
            results = await lines_of(session, batch["results_url"], ANTHROPIC)
            kinds = {r["custom_id"]: r["result"]["type"] for r in results}
            assert len(kinds) == 40
            assert sorted(set(kinds.values())) == ["expired", "succeeded"]
            _, listing = await call(session, "GET", f"{base}?limit=5", None, ANTHROPIC)
            assert listing["data"][0]["id"] == batch["id"]

    anyio.run(scenario)


def test_batched_structured_answers_go_off_schema_on_the_same_triggers_as_online(
    simulator: RunningSimulator,
) -> None:
    simulator.configure(batch_turnaround_s=0.0)
    base = simulator.base_url
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}},
        "required": ["label"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "row", "schema": schema}}
    texts = ["plain", "once [[sim:bad_json]]", "never [[sim:always_bad_json]]"]

    def requests(round_: int) -> bytes:
        return jsonl(
            [
                {
                    "custom_id": f"r{round_}-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {**body(text), "response_format": response_format},
                }
                for i, text in enumerate(texts)
            ]
        )

    def parses(line: dict[str, Any]) -> bool:
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        try:
            return isinstance(orjson.loads(content), dict)
        except orjson.JSONDecodeError:
            return False

    async def answered(session: aiohttp.ClientSession, round_: int) -> list[bool]:
        file_id = await upload(session, base, requests(round_))
        create = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        _, batch = await call(session, "POST", f"{base}/batches", create)
        _, batch = await call(session, "GET", f"{base}/batches/{batch['id']}")
        lines = await lines_of(session, f"{base}/files/{batch['output_file_id']}/content")
        by_id = {line["custom_id"]: line for line in lines}
        return [parses(by_id[f"r{round_}-{i}"]) for i in range(len(texts))]

    async def scenario() -> tuple[list[bool], list[bool]]:
        async with aiohttp.ClientSession() as session:
            return await answered(session, 1), await answered(session, 2)

    first, second = anyio.run(scenario)

    assert first == [True, False, False]
    assert second == [True, True, False]  # [[sim:bad_json]] spoils only the first answer
