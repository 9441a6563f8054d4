"""Batch APIs of the simulator: OpenAI-style Files + Batches and Anthropic Message Batches.

OpenAI / xAI (any prefix): ``POST .../files`` (multipart, ``purpose=batch``, streamed to
disk), ``GET .../files/{id}``, ``GET .../files/{id}/content``; ``POST .../batches``
(``input_file_id``, ``endpoint``, ``completion_window``, ``metadata``), ``GET
.../batches[?limit=&after=]``, ``GET .../batches/{id}``, ``POST .../batches/{id}/cancel``.

Anthropic: ``POST .../messages/batches`` (``requests: [{custom_id, params}]``), ``GET
.../messages/batches[?limit=&after_id=]``, ``GET .../messages/batches/{id}``, ``GET
.../messages/batches/{id}/results``, ``POST .../messages/batches/{id}/cancel``.

A batch moves through its states on the wall clock: ``batch_turnaround_s`` after it
was created it ends, and every request is answered then, exactly as the online
endpoints would answer it (same deterministic content, usage and triggers), except
that ``batch_fail_rate`` of them fail with a 500 and ``batch_expire_rate`` of them
expire (an OpenAI batch with expired requests ends as ``expired``, its finished
requests in the output file and the rest in the error file as ``batch_expired``).
A line whose prompt holds ``[[sim:batch_invalid]]`` fails validation (OpenAI: the
batch ends ``failed`` with line errors; Anthropic: the create call gets a 400).
"""

from __future__ import annotations

import itertools
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

from . import errors as E
from . import payloads as P
from .behaviour import normalize_messages, parse_triggers, request_key
from .handlers import maybe_invalid
from .structured import OutputError, anthropic_output, openai_output

if TYPE_CHECKING:
    from .server import Simulator

OPENAI_MAX_REQUESTS = 50_000
OPENAI_MAX_BYTES = 200 * 1024**2
ANTHROPIC_MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
INVALID_TRIGGER = "[[sim:batch_invalid]]"
_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):024x}"


@dataclass
class StoredFile:
    id: str
    path: Path
    purpose: str
    filename: str
    bytes: int
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class Batch:
    id: str
    anthropic: bool
    created_at: float
    total: int
    input_file_id: str | None = None
    endpoint: str = "/v1/chat/completions"
    metadata: dict[str, str] | None = None
    requests: list[dict[str, Any]] | None = None  # Anthropic: held until processed
    status: str = "validating"
    errors: list[dict[str, Any]] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    canceled: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: Path | None = None
    cancel_requested_at: float | None = None
    cancel_looks: int = 0  # looks left before a cancellation completes
    finished_at: float | None = None
    due: bool = False  # ends at the next look, whatever the turnaround (`finish_open`)


class BatchStore:
    """Files and batches of one simulator; answers are computed when a batch ends."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self._dir: Path | None = None
        self._rng = random.Random(sim.config.seed + 7)

    def finish_open(self) -> int:
        """Let every batch open now end at its next look (how many), while batches
        created later keep the turnaround: a test's control of the provider's clock."""
        open_now = [b for b in self.batches.values() if b.finished_at is None]
        for batch in open_now:
            batch.due = True
        return len(open_now)

    # --- storage -----------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="llm-simulator-files-"))
        return self._dir / name

    def _store_bytes(self, data: bytes, purpose: str, filename: str) -> StoredFile:
        file_id = _new_id("file-")
        path = self._path(file_id)
        path.write_bytes(data)
        return self._register(file_id, path, purpose, filename)

    def _register(self, file_id: str, path: Path, purpose: str, filename: str) -> StoredFile:
        stored = StoredFile(file_id, path, purpose, filename, path.stat().st_size, int(time.time()))
        self.files[file_id] = stored
        return stored

    def close(self) -> None:
        for stored in self.files.values():
            stored.path.unlink(missing_ok=True)
        self.files.clear()

    # --- routing -----------------------------------------------------------------------

    async def dispatch(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """The response for a batch or file URL, or None when `path` is not one."""
        parts = path.split("/")
        method = request.method
        if "messages" in parts and "batches" in parts[parts.index("messages") :]:
            tail = parts[parts.index("messages") + 2 :]
            return await self._anthropic(request, method, tail)
        if "batches" in parts:
            tail = parts[parts.index("batches") + 1 :]
            return await self._openai_batches(request, method, tail)
        if "files" in parts:
            tail = parts[parts.index("files") + 1 :]
            return await self._files(request, method, tail)
        return None

    def _auth(self, request: web.Request, anthropic: bool) -> None:
        self.sim.check_auth(request, None, anthropic)

    # --- OpenAI files --------------------------------------------------------------------

    async def _files(
        self, request: web.Request, method: str, tail: list[str]
    ) -> web.StreamResponse:
        self._auth(request, anthropic=False)
        if not tail and method == "POST":
            return await self._upload(request)
        if not tail and method == "GET":
            data = [f.as_json() for f in self.files.values()]
            return E.json_response({"object": "list", "data": data, "has_more": False})
        stored = self.files.get(tail[0]) if tail else None
        if stored is None:
            return _not_found(f"No such File object: {tail[0] if tail else ''}")
        if len(tail) == 1 and method == "GET":
            return E.json_response(stored.as_json())
        if len(tail) == 1 and method == "DELETE":
            stored.path.unlink(missing_ok=True)
            del self.files[stored.id]
            return E.json_response({"id": stored.id, "object": "file", "deleted": True})
        if len(tail) == 2 and tail[1] == "content" and method == "GET":
            response = web.FileResponse(stored.path)
            response.content_type = "application/jsonl"
            return response
        return _not_found(f"Unknown request URL: {method} {request.path}.")

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return _invalid("Uploads must be multipart/form-data with 'file' and 'purpose'.")
        reader = await request.multipart()
        purpose: str | None = None
        file_id = _new_id("file-")
        path = self._path(file_id)
        filename = "upload.jsonl"
        got_file = False
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):  # nested multipart: not accepted
                return _invalid("Nested multipart bodies are not supported.")
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                with path.open("wb") as sink:  # streamed: a 200 MB upload never sits in memory
                    while chunk := await part.read_chunk(1 << 20):
                        sink.write(chunk)
                got_file = True
        if not got_file:
            return _invalid("Missing required parameter: 'file'.", "file")
        if purpose != "batch":
            path.unlink(missing_ok=True)
            return _invalid("Invalid value for 'purpose': this simulator accepts 'batch'.")
        if path.stat().st_size > OPENAI_MAX_BYTES:
            path.unlink(missing_ok=True)
            return _invalid(f"File is larger than {OPENAI_MAX_BYTES} bytes.", "file")
        self.sim.stats_obj.files_uploaded += 1
        return E.json_response(self._register(file_id, path, purpose, filename).as_json())

    # --- OpenAI batches ------------------------------------------------------------------

    async def _openai_batches(
        self, request: web.Request, method: str, tail: list[str]
    ) -> web.StreamResponse:
        self._auth(request, anthropic=False)
        if not tail and method == "POST":
            return await self._create_openai(request)
        if not tail and method == "GET":
            return self._list(request, anthropic=False)
        batch = self.batches.get(tail[0]) if tail else None
        if batch is None or batch.anthropic:
            return _not_found(f"No batch found with id '{tail[0] if tail else ''}'.")
        if len(tail) == 1 and method == "GET":
            return E.json_response(self._openai_json(batch))
        if len(tail) == 2 and tail[1] == "cancel" and method == "POST":
            self._cancel(batch)
            return E.json_response(self._openai_json(batch))
        return _not_found(f"Unknown request URL: {method} {request.path}.")

    async def _create_openai(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return _invalid("We could not parse the JSON body of your request.")
        stored = self.files.get(str(body.get("input_file_id")))
        if stored is None:
            return _invalid(f"No such File object: {body.get('input_file_id')}", "input_file_id")
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/responses"):
            return _invalid("endpoint must be /v1/chat/completions", "endpoint")
        if body.get("completion_window") != "24h":
            return _invalid("completion_window must be '24h'", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            return _invalid("metadata: up to 16 string pairs", "metadata")
        now = time.time()
        batch = Batch(
            id=_new_id("batch_"),
            anthropic=False,
            created_at=now,
            total=0,
            input_file_id=stored.id,
            endpoint=str(body["endpoint"]),
            metadata=metadata,
        )
        self.batches[batch.id] = batch
        self.sim.stats_obj.batches_created += 1
        if self.sim.config.batch_drop_create_response:
            # The batch exists, but the caller never learns its id (a lost response).
            self.sim.configure(batch_drop_create_response=False)
            from .handlers import drop

            return drop(request)
        return E.json_response(self._openai_json(batch, advance=False))

    def _openai_json(self, batch: Batch, *, advance: bool = True) -> dict[str, Any]:
        if advance:  # the create call's own answer shows the batch as it starts
            self._advance(batch)
        errors = {"object": "list", "data": batch.errors} if batch.errors else None

        def stamp(condition: bool, value: float | None) -> int | None:
            return int(value) if condition and value is not None else None

        ended = batch.finished_at
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": errors,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "in_progress_at": stamp(batch.status != "validating", batch.created_at),
            "expires_at": int(batch.created_at + 86400),
            "finalizing_at": stamp(batch.status in ("finalizing", "completed"), ended),
            "completed_at": stamp(batch.status == "completed", ended),
            "failed_at": stamp(batch.status == "failed", ended),
            "expired_at": stamp(batch.status == "expired", ended),
            "cancelling_at": stamp(
                batch.cancel_requested_at is not None, batch.cancel_requested_at
            ),
            "cancelled_at": stamp(batch.status == "cancelled", ended),
            "request_counts": {
                "total": batch.total,
                "completed": batch.succeeded,
                "failed": batch.failed + batch.expired + batch.canceled,
            },
            "metadata": batch.metadata,
        }

    # --- Anthropic message batches -------------------------------------------------------

    async def _anthropic(
        self, request: web.Request, method: str, tail: list[str]
    ) -> web.StreamResponse:
        self._auth(request, anthropic=True)
        if not tail and method == "POST":
            return await self._create_anthropic(request)
        if not tail and method == "GET":
            return self._list(request, anthropic=True)
        batch = self.batches.get(tail[0]) if tail else None
        if batch is None or not batch.anthropic:
            msg = f"message_batch_id: no batch {tail[0] if tail else ''}"
            return E.json_response(E.anthropic_error(404, msg), 404)
        if len(tail) == 1 and method == "GET":
            return E.json_response(self._anthropic_json(batch, request))
        if len(tail) == 2 and tail[1] == "cancel" and method == "POST":
            self._cancel(batch)
            return E.json_response(self._anthropic_json(batch, request))
        if len(tail) == 2 and tail[1] == "results" and method == "GET":
            self._advance(batch)
            if batch.results is None:
                msg = "Results are not available until processing has ended."
                return E.json_response(E.anthropic_error(400, msg), 400)
            response = web.FileResponse(batch.results)
            response.content_type = "application/x-jsonl"
            return response
        msg = f"Unknown request URL: {method} {request.path}."
        return E.json_response(E.anthropic_error(404, msg), 404)

    async def _create_anthropic(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _anthropic_invalid("requests: a non-empty list is required")
        if len(requests) > ANTHROPIC_MAX_REQUESTS:
            return _anthropic_invalid(f"requests: at most {ANTHROPIC_MAX_REQUESTS} requests")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            problem = _anthropic_line_problem(item, seen)
            if problem is not None:
                return _anthropic_invalid(f"requests.{i}: {problem}")
        now = time.time()
        batch = Batch(
            id=_new_id("msgbatch_"),
            anthropic=True,
            created_at=now,
            total=len(requests),
            requests=requests,
            status="in_progress",
        )
        self.batches[batch.id] = batch
        self.sim.stats_obj.batches_created += 1
        return E.json_response(self._anthropic_json(batch, request, advance=False))

    def _anthropic_json(
        self, batch: Batch, request: web.Request, *, advance: bool = True
    ) -> dict[str, Any]:
        if advance:
            self._advance(batch)
        ended = batch.status in ("ended",)
        processing = batch.total - (batch.succeeded + batch.failed + batch.expired + batch.canceled)
        base = f"{request.scheme}://{request.host}{request.path.split('/messages/batches')[0]}"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": {
                "processing": processing,
                "succeeded": batch.succeeded,
                "errored": batch.failed,
                "canceled": batch.canceled,
                "expired": batch.expired,
            },
            "ended_at": _rfc3339(batch.finished_at) if ended and batch.finished_at else None,
            "created_at": _rfc3339(batch.created_at),
            "expires_at": _rfc3339(batch.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(batch.cancel_requested_at)
            if batch.cancel_requested_at
            else None,
            "results_url": f"{base}/messages/batches/{batch.id}/results" if ended else None,
        }

    # --- shared --------------------------------------------------------------------------

    def _list(self, request: web.Request, anthropic: bool) -> web.StreamResponse:
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            limit = 20
        after = request.query.get("after_id" if anthropic else "after")
        newest_first = [b for b in reversed(self.batches.values()) if b.anthropic == anthropic]
        if after:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        if anthropic:
            data = [self._anthropic_json(b, request) for b in page]
        else:
            data = [self._openai_json(b) for b in page]
        return E.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    def _cancel(self, batch: Batch) -> None:
        self._advance(batch)
        if batch.status in ("validating", "in_progress"):
            batch.cancel_requested_at = time.time()
            batch.status = "canceling" if batch.anthropic else "cancelling"
            batch.cancel_looks = 1  # the cancel call's own answer still says so

    def _advance(self, batch: Batch) -> None:
        """Move the batch along its states as the clock says."""
        now = time.time()
        if batch.status == "validating":
            self._validate(batch)
        if batch.status in ("cancelling", "canceling"):
            if batch.cancel_looks > 0:
                batch.cancel_looks -= 1
            else:
                self._process(batch, cancelled=True)
            return
        if batch.status == "in_progress":
            # The turnaround is read now, so a test can shorten it for batches already created.
            if batch.due or now >= batch.created_at + self.sim.config.batch_turnaround_s:
                self._process(batch, cancelled=False)
        elif batch.status == "finalizing":
            self._process(batch, cancelled=False)

    def _validate(self, batch: Batch) -> None:
        stored = self.files.get(batch.input_file_id or "")
        errors: list[dict[str, Any]] = []
        total = 0
        models: set[str] = set()
        seen: set[str] = set()
        if stored is None:
            errors.append(_line_error("invalid_file", None, "the input file was deleted"))
        else:
            with stored.path.open("rb") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    total += 1
                    problem = _openai_line_problem(line, batch.endpoint, seen, models)
                    if problem is not None:
                        errors.append(_line_error("invalid_request", number, problem))
        if total > OPENAI_MAX_REQUESTS:
            errors.append(
                _line_error("too_many_requests", None, f"more than {OPENAI_MAX_REQUESTS} requests")
            )
        if len(models) > 1:
            errors.append(_line_error("mixed_models", None, "a batch may use only one model"))
        batch.total = total
        if errors:
            batch.errors = errors[:100]
            batch.status = "failed"
            batch.finished_at = time.time()
        else:
            batch.status = "in_progress"

    def _lines(self, batch: Batch) -> Any:
        if batch.anthropic:
            yield from batch.requests or []
            return
        stored = self.files.get(batch.input_file_id or "")
        if stored is None:
            return
        with stored.path.open("rb") as lines:
            for line in lines:
                if line.strip():
                    yield orjson.loads(line)

    def _process(self, batch: Batch, *, cancelled: bool) -> None:
        """Answer every request (the cancelled ones only up to cancellation)."""
        cfg = self.sim.config
        out_path = self._path(_new_id("out-"))
        err_path = self._path(_new_id("err-"))
        expired_any = False
        with out_path.open("wb") as out, err_path.open("wb") as err:
            for item in self._lines(batch):
                custom_id = str(item.get("custom_id"))
                body = item.get("params" if batch.anthropic else "body") or {}
                draw = self._rng.random()
                if cancelled:
                    batch.canceled += 1
                    result = self._unfinished(batch, custom_id, "canceled")
                    (out if batch.anthropic else err).write(orjson.dumps(result) + b"\n")
                    continue
                if draw < cfg.batch_expire_rate:
                    batch.expired += 1
                    expired_any = True
                    result = self._unfinished(batch, custom_id, "expired")
                    (out if batch.anthropic else err).write(orjson.dumps(result) + b"\n")
                    continue
                if draw < cfg.batch_expire_rate + cfg.batch_fail_rate:
                    status, payload = 500, _server_error(batch.anthropic)
                else:
                    status, payload = self.answer(body, batch.anthropic)
                if status == 200:
                    batch.succeeded += 1
                    sink = out
                else:
                    batch.failed += 1
                    sink = out if batch.anthropic else err
                sink.write(orjson.dumps(self._result(batch, custom_id, status, payload)) + b"\n")
        batch.requests = None
        batch.finished_at = time.time()
        if batch.anthropic:
            batch.status = "ended"
            batch.results = out_path
            err_path.unlink(missing_ok=True)
            return
        for path, attr in ((out_path, "output_file_id"), (err_path, "error_file_id")):
            if path.stat().st_size:
                file_id = path.name.replace("out-", "file-").replace("err-", "file-")
                self._register(file_id, path, "batch_output", f"{batch.id}_{attr}.jsonl")
                setattr(batch, attr, file_id)
            else:
                path.unlink(missing_ok=True)
        if cancelled:
            batch.status = "cancelled"
        elif expired_any:
            batch.status = "expired"
        else:
            batch.status = "completed"

    def answer(self, body: dict[str, Any], anthropic: bool) -> tuple[int, dict[str, Any]]:
        """What the online endpoint would answer for this body (status, payload)."""
        sim = self.sim
        cfg = sim.config
        model = body.get("model")
        if not isinstance(model, str) or (not cfg.accept_any_model and model not in sim.models):
            if anthropic:
                return 404, E.anthropic_error(404, f"model: {model}")
            return 404, E.openai_error(
                f"The model `{model}` does not exist", "invalid_request_error", "model_not_found"
            )
        if anthropic:
            msgs = normalize_messages(body.get("messages"), body.get("system"))
            thinking = body.get("thinking")
            with_reasoning = (
                isinstance(thinking, dict)
                and thinking.get("type") in ("enabled", "adaptive")
                and cfg.reasoning_style != "none"
            )
            max_tokens = body.get("max_tokens")
        else:
            msgs = normalize_messages(body.get("messages"))
            with_reasoning = cfg.reasoning_style != "none"
            mt = body.get("max_completion_tokens")
            max_tokens = mt if mt is not None else body.get("max_tokens")
        triggers = parse_triggers(msgs)
        if triggers is not None and triggers.replay is not None:
            sim.stats_obj.answered(request_key(body))
            sim.stats_obj.batch_requests_paid += 1
            return 200, sim.replay_entry(triggers.replay)["body"]
        if triggers is not None and triggers.status is not None:
            status = triggers.status
            payload = (
                E.anthropic_status_error(status) if anthropic else E.openai_status_error(status)
            )
            return status, payload
        try:
            output = (
                anthropic_output(body, triggers)
                if anthropic
                else openai_output(body, msgs, triggers)
            )
        except OutputError as exc:
            if anthropic:
                return 400, E.anthropic_error(400, str(exc))
            return 400, E.openai_error(str(exc), "invalid_request_error", None, exc.param)
        if output is not None and triggers is not None:  # [[sim:bad_json]], as online
            output = maybe_invalid(sim, output, triggers, request_key(body), truncate=False)
        limit = max_tokens if isinstance(max_tokens, int) else None
        c = sim.completion_for(model, msgs, limit, with_reasoning, triggers, None, output)
        if anthropic:
            c = sim.cached(body, model, c)
        sim.stats_obj.paid(request_key(body), c)
        sim.stats_obj.batch_requests_paid += 1
        if anthropic:
            return 200, P.anthropic_response(c, model, cfg.thinking_details, "batch")
        return 200, P.openai_response(c, model, cfg.reasoning_style, cfg.usage_style)

    @staticmethod
    def _result(batch: Batch, custom_id: str, status: int, payload: Any) -> dict[str, Any]:
        if batch.anthropic:
            if status == 200:
                return {"custom_id": custom_id, "result": {"type": "succeeded", "message": payload}}
            return {"custom_id": custom_id, "result": {"type": "errored", "error": payload}}
        return {
            "id": _new_id("batch_req_"),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": E.request_id(), "body": payload},
            "error": None,
        }

    @staticmethod
    def _unfinished(batch: Batch, custom_id: str, kind: str) -> dict[str, Any]:
        if batch.anthropic:
            return {"custom_id": custom_id, "result": {"type": kind}}
        code = "batch_expired" if kind == "expired" else "batch_cancelled"
        message = (
            "This request could not be executed before the completion window expired."
            if kind == "expired"
            else "This request was not executed because the batch was cancelled."
        )
        return {
            "id": _new_id("batch_req_"),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }


def _openai_line_problem(
    line: bytes, endpoint: str, seen: set[str], models: set[str]
) -> str | None:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "line is not valid JSON"
    if not isinstance(item, dict):
        return "line is not a JSON object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id: a non-empty string is required"
    if custom_id in seen:
        return f"custom_id '{custom_id}' is used more than once"
    seen.add(custom_id)
    if item.get("method") != "POST":
        return "method must be POST"
    if item.get("url") != endpoint:
        return f"url must match the batch endpoint {endpoint}"
    body = item.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "body: an object with a model is required"
    if body.get("stream") is True:
        return "body.stream is not supported in a batch"
    if INVALID_TRIGGER.encode() in line:
        return "body: this request was marked invalid"
    models.add(body["model"])
    return None


def _anthropic_line_problem(item: Any, seen: set[str]) -> str | None:
    if not isinstance(item, dict):
        return "each request must be an object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        return "custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"
    if custom_id in seen:
        return f"custom_id '{custom_id}' is used more than once"
    seen.add(custom_id)
    params = item.get("params")
    if not isinstance(params, dict):
        return "params: Field required"
    for name in ("model", "max_tokens", "messages"):
        if name not in params:
            return f"params.{name}: Field required"
    if params.get("stream") is True:
        return "params.stream: streaming is not supported in a batch"
    if INVALID_TRIGGER in orjson.dumps(params).decode():
        return "params: this request was marked invalid"
    return None


def _line_error(code: str, line: int | None, message: str) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": None}


def _server_error(anthropic: bool) -> dict[str, Any]:
    if anthropic:
        return E.anthropic_error(500, "Internal server error (simulated).")
    return E.openai_status_error(500)


def _rfc3339(value: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(value)) + f".{int(value % 1 * 1e6):06d}Z"


def _invalid(message: str, param: str | None = None) -> web.Response:
    return E.json_response(E.openai_error(message, "invalid_request_error", None, param), 400)


def _anthropic_invalid(message: str) -> web.Response:
    return E.json_response(E.anthropic_error(400, message), 400)


def _not_found(message: str) -> web.Response:
    return E.json_response(E.openai_error(message, "invalid_request_error", "not_found"), 404)
