"""Prompt templates: compiled once, checked against the input columns, rendered per row."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from pipeline.errors import SpecError
from pipeline.spec import PromptSpec
from pipeline.types import Message


def _blank_for_none(value: Any) -> Any:
    # An empty CSV cell should read as nothing, not as the word "None".
    return "" if value is None else value


class PromptRenderer:
    """Turns one input row into the chat messages for it."""

    def __init__(self, prompt: PromptSpec) -> None:
        self._env = SandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, finalize=_blank_for_none
        )
        self._parts: list[tuple[str, Any]] = []
        self.variables: set[str] = set()
        if prompt.system:
            self._add("system", prompt.system, "prompt.system")
        self._add("user", prompt.template, "prompt.template")

    def _add(self, role: str, source: str, where: str) -> None:
        try:
            parsed = self._env.parse(source)
        except TemplateSyntaxError as exc:
            raise SpecError(
                f"{where}: template error on line {exc.lineno}: {exc.message}"
            ) from None
        self.variables |= meta.find_undeclared_variables(parsed)
        self._parts.append((role, self._env.from_string(source)))

    def check_columns(self, columns: list[str]) -> None:
        missing = sorted(self.variables - set(columns))
        if missing:
            raise SpecError(
                f"prompt: template variable(s) {', '.join(missing)} not found among the input "
                f"columns ({', '.join(columns)})"
            )

    def render(self, row: dict[str, Any]) -> list[Message]:
        return [{"role": role, "content": template.render(row)} for role, template in self._parts]


def request_hash(model: str, params: dict[str, Any], messages: list[Message]) -> str:
    """Identifies the exact request a row was: same hash, same paid answer."""
    payload = orjson.dumps([model, params, messages], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def estimate_prompt_tokens(messages: list[Message]) -> int:
    """A cheap, offline estimate: ~4 characters a token plus per-message overhead."""
    return 3 + sum(4 + math.ceil(len(m["content"]) / 4) for m in messages)
