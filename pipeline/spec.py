"""The job spec: YAML in, a strict and fully validated `JobSpec` out.

The key names are a public contract. Unknown keys are refused with a hint, so a
typo in an overnight job fails in a second instead of silently using a default.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ColumnType = Literal["string", "integer", "number", "boolean", "date", "datetime"]


class InputSpec(_Strict):
    path: str = Field(min_length=1)
    id_column: str | None = None
    # CSV only: a column's type instead of the one inferred from the first rows.
    types: dict[str, ColumnType] | None = None


class TierPricing(_Strict):
    """USD per million tokens on one service tier (OpenAI's flex or priority)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)


class Pricing(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    # Prompt tokens written to the cache (Anthropic: 1.25x input); unset: the input price.
    cache_write: float | None = Field(default=None, ge=0)
    # Prices through the provider's batch API; unset: the preset's batch_discount applies.
    batch_input: float | None = Field(default=None, ge=0)
    batch_output: float | None = Field(default=None, ge=0)
    batch_cached_input: float | None = Field(default=None, ge=0)
    # Prices on the service tiers the provider reports (`service_tier` in its answer).
    service_tiers: dict[str, TierPricing] | None = None


class ModelSpec(_Strict):
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    pricing: Pricing | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Mark the prompt's stable prefix (everything before its last message) cacheable:
    # true, or the cache key to send where the provider takes one (`prompt_cache_key`).
    prompt_cache: bool | str = False
    # Send through the provider's batch API (half price, results within 24 h).
    batch: bool = False
    batch_poll_s: float = Field(default=30.0, gt=0)
    # Tokens the model takes in one request (prompt and answer); unset: the model's entry
    # in configs/pricing.yaml, and no local check for a model that has none.
    context_window: int | None = Field(default=None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _an_http_url(cls, url: str | None) -> str | None:
        # A typo here would otherwise fail every row at its first request.
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{url!r} is not an http(s) URL with a host; write it like "
                "https://api.example.com/v1"
            )
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        return url

    @field_validator("tools")
    @classmethod
    def _named_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or []):
            if tool.get("type") not in (None, "function", "custom"):
                continue  # the provider's own tool (web_search_20250305, ...): sent as written
            function = tool.get("function") if tool.get("type") == "function" else tool
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                form = "{type: function, function: {name, parameters}} or {name, input_schema}"
                raise ValueError(f"tool {i} has no name: write it as {form}")
        return tools

    @field_validator("params")
    @classmethod
    def _params_owned_elsewhere(cls, params: dict[str, Any]) -> dict[str, Any]:
        owned = {
            "messages": "prompt",
            "model": "model.model",
            "stream": "model.stream",
            "stream_options": "model.stream",
            "tools": "model.tools",
            "tool_choice": "model.tool_choice",
        }
        for key, owner in owned.items():
            if key in params:
                raise ValueError(f"'{key}' cannot be set in model.params; use {owner}")
        choices = params.get("n")
        if choices not in (None, 1):
            # One output row holds one answer; several would be paid for and lost (or garbled).
            raise ValueError(
                f"n: {choices!r} asks for several answers per row, but a row stores one; "
                "remove n (or set it to 1), and repeat the rows in the input for several samples"
            )
        return params


class SpecWarning(UserWarning):
    """Something in the job will probably not work as intended."""


class MessageSpec(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class PromptSpec(_Strict):
    system: str | None = None
    template: str | None = Field(default=None, min_length=1)
    messages: list[MessageSpec] | None = Field(default=None, min_length=1)
    # Rows whose user message(s) render to nothing are not sent; see docs/JOB_SPEC.md.
    skip_empty: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> PromptSpec:
        if (self.template is None) == (self.messages is None):
            raise ValueError("give either prompt.template or prompt.messages (not both)")
        if self.messages is not None and not any(m.role == "user" for m in self.messages):
            raise ValueError("prompt.messages needs at least one user message")
        return self

    def parts(self) -> list[tuple[str, str, str]]:
        """(role, template source, where) for every message, in order."""
        parts = [("system", self.system, "prompt.system")] if self.system else []
        if self.messages is not None:
            parts += [
                (m.role, m.content, f"prompt.messages.{i}") for i, m in enumerate(self.messages)
            ]
        else:
            parts.append(("user", self.template or "", "prompt.template"))
        return parts


class LimitsSpec(_Strict):
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=100)
    timeout_s: float = Field(default=120.0, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_tokens_total: int | None = Field(default=None, gt=0)
    # None: from what the server says (breaker.default_stall_s), 2 to 10 minutes.
    stall_timeout_s: float | None = Field(default=None, gt=0)


class OutputSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: str | None = None
    # "schema" would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_retries: int = Field(default=1, ge=0, le=10)


class CacheSpec(_Strict):
    path: str = Field(min_length=1)
    max_entries: int = Field(default=1_000_000, ge=1)


class ReduceSpec(_Strict):
    # The columns whose values make a group: input columns or earlier steps' columns.
    by: list[str] = Field(min_length=1)
    # A group whose rows estimate over this many tokens is sent in parts, whose answers
    # one more request per group combines (`combine`); see pipeline/steps_reduce.py.
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    combine: PromptSpec | None = None

    @field_validator("by", mode="before")
    @classmethod
    def _one_or_many(cls, by: object) -> object:
        return [by] if isinstance(by, str) else by


class StepOutputSpec(_Strict):
    """A step's answer shape; where it is written follows from the job's output."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_retries: int = Field(default=1, ge=0, le=10)


class StepSpec(_Strict):
    """One step of a multi-step job (docs/JOB_SPEC.md, `steps`). `model` and `limits`
    arrive merged over the job's (see `JobSpec._merge_step_overrides`)."""

    # Prefixes the step's columns in the output, so it must read as a column name.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    prompt: PromptSpec
    when: str | None = Field(default=None, min_length=1)
    reduce: ReduceSpec | None = None
    model: ModelSpec | None = None
    limits: LimitsSpec | None = None
    output: StepOutputSpec = Field(default_factory=StepOutputSpec)


class JobSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    input: InputSpec
    model: ModelSpec
    # Exactly one of the two: a single prompt, or a list of steps (pipeline/steps.py).
    prompt: PromptSpec | None = None
    steps: list[StepSpec] | None = Field(default=None, min_length=1)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # Opt-in: an answer is kept when only model.params changed since it was given,
    # unless it was cut short (finish_reason: length) or failed (pipeline/carry.py).
    reuse_across_params: bool = False
    # Opt-in: a folder of answers shared by every job on this machine (pipeline/cache.py).
    cache: CacheSpec | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _folder_alone(cls, cache: object) -> object:
        return {"path": cache} if isinstance(cache, str) else cache

    @field_validator("prompt", "steps", mode="before")
    @classmethod
    def _not_blank(cls, value: object, info: ValidationInfo) -> object:
        # Optional only in that a job has one or the other: a key left without a value
        # is a mistake worded as for any other section.
        if value is None:
            section = PromptSpec if info.field_name == "prompt" else StepSpec
            keys = ", ".join(f.alias or n for n, f in section.model_fields.items())
            what = "a mapping" if info.field_name == "prompt" else "a list of steps, each a mapping"
            raise ValueError(
                f"expected {what} with keys among {keys}, got nothing (the key has no value; "
                "remove it or give it one)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _merge_step_overrides(cls, data: Any) -> Any:
        """A step's `model` and `limits` are overrides of the job's: merged here, so a
        merged section is checked (and its mistakes named) under the step's key."""
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            return data
        steps = []
        for step in data["steps"]:
            if isinstance(step, dict):
                step = dict(step)
                for key in ("model", "limits"):
                    if isinstance(step.get(key), dict) and isinstance(data.get(key, {}), dict):
                        step[key] = _merged(data.get(key) or {}, step[key])
            steps.append(step)
        return {**data, "steps": steps}

    @model_validator(mode="after")
    def _prompt_or_steps(self) -> JobSpec:
        if self.prompt is None and self.steps is None:
            raise ValueError("prompt: required key is missing (or give steps, for several)")
        if self.prompt is not None and self.steps is not None:
            raise ValueError("give either prompt (one step) or steps (several), not both")
        if self.steps is not None:
            names = [step.name for step in self.steps]
            if repeated := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"steps: step name(s) {', '.join(repeated)} used twice")
        return self

    @property
    def the_prompt(self) -> PromptSpec:
        """The prompt of a job that has one: every job a run resolves (a step is resolved
        into a job of its own with the step's prompt)."""
        if self.prompt is None:
            raise SpecError(
                "this job has steps: validate, run, status and estimate take the job file; "
                "report, show and export take a step's output "
                "(<output>.run/steps/<step name>/output.parquet)"
            )
        return self.prompt

    @property
    def output_path(self) -> Path:
        return Path(self.output.path or f"out/{self.name}.parquet")

    @model_validator(mode="after")
    def _cached_prefix_is_the_same_for_every_row(self) -> JobSpec:
        if not self.model.prompt_cache or self.prompt is None:  # a step is checked as its job
            return self
        for _, source, where in self.prompt.parts()[:-1]:
            if "{{" in source or "{%" in source:
                # A prefix that changes per row is written to the cache (at a higher
                # price) for every row and never read back.
                raise ValueError(
                    f"model.prompt_cache caches everything before the last message, but "
                    f"{where} uses row variables; move them into the last message"
                )
        return self


def with_cache(spec: JobSpec, folder: str) -> JobSpec:
    """The job with `cache:` set to `folder` (`run --cache DIR`)."""
    limit = spec.cache.max_entries if spec.cache else CacheSpec.model_fields["max_entries"].default
    return spec.model_copy(update={"cache": CacheSpec(path=folder, max_entries=limit)})


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, one level deep into `params` (a step that sets
    `max_tokens` keeps the job's `temperature`)."""
    merged = {**base, **override}
    if isinstance(base.get("params"), dict) and isinstance(override.get("params"), dict):
        merged["params"] = {**base["params"], **override["params"]}
    return merged


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job file; every problem is a `SpecError` naming file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: job file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read job file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job file must be a YAML mapping with input, model and prompt")
    # A file called "my reviews.yaml" still gets a usable default name.
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "job")
    _resolve_paths(data, path.parent)
    return parse_spec(data, source=str(path))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a job file are relative to the job file, not to where it is run.

    `pipeline run ../other/job.yaml` must read and write the other project's files,
    never this directory's files of the same names.
    """
    with contextlib.suppress(ValueError, OSError):
        # Kept short for messages when the job file is under the current directory.
        if not (relative := os.path.relpath(base)).startswith(".."):
            base = Path(relative)
    if base == Path("."):
        return
    sections = [(data.get("input"), "path")]
    output = data.get("output")
    if output is None or (isinstance(output, dict) and output.get("path") is None):
        name = data.get("name")
        if isinstance(name, str) and name:
            output = data["output"] = {**(output or {}), "path": f"out/{name}.parquet"}
    sections.append((output, "path"))
    cache = data.get("cache")
    if isinstance(cache, str):
        cache = data["cache"] = {"path": cache}
    sections.append((cache, "path"))
    for section, key in sections:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            value = section[key]
            remote = "://" in value  # an object-storage URI is not a path
            if value and not remote and not Path(value).expanduser().is_absolute():
                section[key] = str(base / value)


def parse_spec(data: dict[str, Any], *, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {problem}" for problem in describe_errors(exc.errors()))
        raise SpecError(f"{source}: invalid job spec:\n{problems}") from None


def describe_errors(errors: list[Any]) -> list[str]:
    """One line per wrong key, in this project's words (pydantic's never reach the user).

    A key that may take several types (`tool_choice`: text or a mapping) gets one
    error per type from pydantic; they are joined into one line.
    """
    by_key: dict[str, list[Any]] = {}
    for err in errors:
        location = [str(part) for part in err["loc"] if not _is_type_tag(part)]
        by_key.setdefault(".".join(location) or "(top level)", []).append((location, err))
    lines = []
    for where, found in by_key.items():
        if len(found) > 1 and all(e["type"] in _EXPECTED for _, e in found):
            wanted = " or ".join(_EXPECTED[e["type"]] for _, e in found)
            lines.append(f"{where}: expected {wanted}, got {_shown(found[0][1].get('input'))}")
            continue
        lines.extend(f"{where}: {_describe(location, err)}" for location, err in found)
    return lines


def _is_type_tag(part: object) -> bool:
    # pydantic names the member of a union it tried: 'str', 'dict[str,any]', 'function-after[...]'.
    text = str(part)
    return "[" in text or text in ("str", "int", "float", "bool", "dict", "list", "none")


_EXPECTED = {
    "dict_type": "a mapping (indented `key: value` lines)",
    "model_type": "a mapping (indented `key: value` lines)",
    "model_attributes_type": "a mapping (indented `key: value` lines)",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "list_type": "a list (`- item` lines, or [a, b])",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"),
    "greater_than": ("gt", "must be more than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "less_than": ("lt", "must be less than {}"),
}


def _describe(location: list[str], err: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return f"unknown key{_did_you_mean(location)}"
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        section = _section_at(location)
        if section is not None and kind in ("model_type", "dict_type"):
            keys = ", ".join(f.alias or n for n, f in section.model_fields.items())
            expected = f"a mapping with keys among {keys}"
        got = (
            "nothing (the key has no value; remove it or give it one)"
            if value is None
            else (_shown(value))
        )
        return f"expected {expected}, got {got}"
    if kind in _BOUNDS:
        name, wording = _BOUNDS[kind]
        return f"{wording.format(ctx.get(name))}, got {_shown(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s)"
    if kind == "string_pattern_mismatch":
        if location == ["name"]:
            return (
                f"{_shown(value)} is not a valid name: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return f"{_shown(value)} does not have the expected form ({ctx.get('pattern')})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_shown(value)}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    return f"invalid value {_shown(value)}"


def _shown(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section_at(location: list[str]) -> type[BaseModel] | None:
    """The spec section class at a key's location, if the key is a section."""
    model: type[BaseModel] = JobSpec
    for part in location:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        nested = _section_model(field.annotation if field else None)
        if nested is None:
            return None
        model = nested
    return model


def _did_you_mean(location: list[str]) -> str:
    model: type[BaseModel] = JobSpec
    for part in location[:-1]:
        if part.isdigit():
            continue  # an index into a list of sections
        field = model.model_fields.get(part)
        nested = _section_model(field.annotation if field else None)
        if nested is None:
            return ""
        model = nested
    names = [field.alias or name for name, field in model.model_fields.items()]
    matches = difflib.get_close_matches(location[-1], names, n=1, cutoff=0.6)
    if matches:
        return f" (did you mean '{matches[0]}'?)"
    return f" (allowed: {', '.join(names)})"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The spec section class inside an annotation like `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if (found := _section_model(arg)) is not None:
            return found
    return None
