"""Prompt templates: compiled once, checked against the input columns, rendered per row."""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from pipeline.errors import SpecError
from pipeline.spec import PromptSpec
from pipeline.types import Message

# Names the Jinja parser turns into literals before any variable lookup.
JINJA_CONSTANTS = frozenset({"true", "false", "none", "True", "False", "None"})


def template_error(exc: Exception) -> str:
    """How a row whose template failed is recorded (the `error` column)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"template_error: {type(exc).__name__}" + (f": {detail}" if detail else "")


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
        self._sources: list[tuple[str, str]] = []
        self._found: set[str] = set()
        self._constants: set[str] = set()
        for role, source, where in prompt.parts():
            self._found |= self._add(role, source, where)
        # Sorted, so a row's values always hash in the same order. A global such as
        # `range` is a variable only when the input has a column of that name.
        self.variables: tuple[str, ...] = tuple(sorted(self._found - set(self._env.globals)))

    def _add(self, role: str, source: str, where: str) -> set[str]:
        try:
            parsed = self._env.parse(source)
        except TemplateSyntaxError as exc:
            raise SpecError(
                f"{where}: template error on line {exc.lineno}: {exc.message}"
            ) from None
        self._parts.append((role, self._env.from_string(source)))
        self._sources.append((role, source))
        self._constants |= {
            value for _, kind, value in self._env.lex(source) if kind == "name"
        } & JINJA_CONSTANTS
        # Jinja leaves its globals (range, dict, ...) out of the undeclared names; they
        # are kept here so that an input column of the same name can shadow them.
        used_globals = {
            node.name
            for node in parsed.find_all(nodes.Name)
            if node.ctx == "load" and node.name in self._env.globals
        }
        return meta.find_undeclared_variables(parsed) | used_globals

    def check_columns(self, columns: list[str]) -> None:
        """Refuse variables the input lacks; make columns shadow Jinja's globals."""
        if clashes := sorted(self._constants & set(columns)):
            raise SpecError(
                f"prompt: the template uses {', '.join(clashes)}, which Jinja always reads as a "
                f"constant, never as the input column of that name; rename the column"
            )
        globals_ = set(self._env.globals)
        self.variables = tuple(
            sorted(v for v in self._found if v not in globals_ or v in set(columns))
        )
        missing = sorted(set(self.variables) - set(columns))
        if missing:
            hints = []
            for name in missing:
                close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
                hints.append(
                    f"{{{{ {name} }}}}"
                    + (f" (did you mean {{{{ {close[0]} }}}}?)" if close else "")
                )
            raise SpecError(
                f"prompt: template variable(s) {', '.join(hints)} not found among the input "
                f"columns ({', '.join(columns)})"
            )

    def render(self, values: tuple[Any, ...]) -> list[Message]:
        """The messages for one row, given its values of `variables` in that order.

        Row values shadow Jinja's globals (a column named `range` is the column).
        Any exception here is about this row only (a filter on an empty cell, say):
        callers record it as the row's `template_error`.
        """
        row = dict(zip(self.variables, values, strict=True))
        return [{"role": role, "content": template.render(row)} for role, template in self._parts]

    def request_hasher(
        self, model: str, params: dict[str, Any], extra: Any = None
    ) -> Callable[[tuple[Any, ...]], str]:
        """A function from a row's values to the hash of the exact request it renders to.

        Templates are deterministic in their variables, so hashing the templates, model
        and params once, then each row's values, identifies the request without
        rendering it: a resumed run skips finished rows at hashing speed.
        """
        spec = orjson.dumps([model, params, self._sources, extra], option=orjson.OPT_SORT_KEYS)
        base = hashlib.blake2b(spec, digest_size=16)

        def digest(values: tuple[Any, ...]) -> str:
            h = base.copy()
            h.update(orjson.dumps(values, default=str))
            return h.hexdigest()

        return digest


def estimate_prompt_tokens(messages: list[Message]) -> int:
    """A cheap, offline estimate: ~4 characters a token plus per-message overhead."""
    return 3 + sum(4 + math.ceil(len(m["content"]) / 4) for m in messages)


# The estimate counts ~4 characters a token; real tokenizers vary around that, so a
# prompt is refused before sending only when it could fit in no tokenizer of ordinary
# text: over the window by half again (it would need 6 characters a token). One between
# the window and that margin is sent, and the provider has the last word (its refusal
# costs nothing).
WINDOW_MARGIN = 1.5
CONTEXT_ERROR = "context_window_exceeded"


def over_window(prompt_estimate: int, window: int | None) -> bool:
    """Whether a prompt clearly cannot fit in the model's context window."""
    return window is not None and prompt_estimate > window * WINDOW_MARGIN


def window_error(prompt_estimate: int, window: int, model: str) -> str:
    """How a row refused for its size is recorded (the `error` column)."""
    return (
        f"{CONTEXT_ERROR}: the prompt is estimated at {prompt_estimate:,} tokens, more than "
        f"{model}'s context window of {window:,} can hold (refused at {WINDOW_MARGIN}x the "
        "window, as the estimate is approximate); nothing was sent. Shorten the prompt or "
        "this row's input, use a model with a larger window, or set model.context_window "
        "if this model's is larger"
    )


def is_empty_prompt(messages: list[Message]) -> bool:
    """Whether every user message rendered to nothing but whitespace."""
    return all(not m["content"].strip() for m in messages if m["role"] == "user")
