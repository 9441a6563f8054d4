"""The job spec: YAML in, a strict and fully validated `JobSpec` out.

The key names are a public contract. Unknown keys are refused with a hint, so a
typo in an overnight job fails in a second instead of silently using a default.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(min_length=1)
    id_column: str | None = None


class Pricing(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


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


class OutputSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: str | None = None
    # "schema" would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_retries: int = Field(default=1, ge=0, le=10)


class JobSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    input: InputSpec
    model: ModelSpec
    prompt: PromptSpec
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @property
    def output_path(self) -> Path:
        return Path(self.output.path or f"out/{self.name}.parquet")


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
    return parse_spec(data, source=str(path))


def parse_spec(data: dict[str, Any], *, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise SpecError(f"{source}: invalid job spec:\n{problems}") from None


def _describe(err: Any) -> str:
    location = [str(part) for part in err["loc"]]
    where = ".".join(location) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key{_did_you_mean(location)}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {err['msg']}"


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
