"""Provider presets and prices from `configs/`, merged with a job's model section."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import SpecError
from pipeline.spec import ModelSpec, Pricing, SpecWarning
from pipeline.structured import OutputSchema
from pipeline.types import Usage

AuthMode = Literal["bearer", "body_key", "x_api_key"]


class ProviderPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: str
    base_url: str | None = None
    api_key_env: str | None = None
    auth: list[AuthMode] = Field(default_factory=lambda: list[AuthMode](["bearer"]))
    model_keys: list[str] = Field(default_factory=lambda: ["model"])
    default_params: dict[str, Any] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    embedded_simulator: dict[str, Any] | None = None
    # How this provider returns output that must match a schema.
    structured_output: Literal["json_schema", "json_object", "tool"] = "json_schema"
    # Anthropic-style providers: the default max_tokens, which their API requires.
    default_max_tokens: int = 1024
    count_tokens: bool = False  # has a count_tokens endpoint
    # The API rejects a forced tool call (a tool_choice naming one, or any) while
    # `thinking` is on, as Anthropic's does: every row would be a 400.
    thinking_forbids_forced_tool: bool = False
    # Takes `prompt_cache_key` (OpenAI) for model.prompt_cache; providers that cache
    # prompts on their own without one (xAI, DeepSeek) need nothing sent.
    prompt_cache_key: bool = False
    # Params some models refuse: a fragment of the model name -> the params it refuses.
    refused_params: dict[str, list[str]] = Field(default_factory=dict)

    def refused_by(self, model: str, params: dict[str, Any]) -> list[str]:
        """The params in `params` that `model` is known to refuse."""
        return sorted(
            {
                p
                for fragment, names in self.refused_params.items()
                if fragment in model
                for p in names
            }
            & set(params)
        )

    # Which batch API the provider has (None: none), for which models (glob patterns;
    # empty: any), and the discount it gives where pricing.yaml names no batch prices.
    batch_api: Literal["openai", "anthropic"] | None = None
    batch_models: list[str] = Field(default_factory=list)
    batch_discount: float | None = Field(default=None, gt=0, le=1)


@dataclass(frozen=True)
class Price:
    """USD per million tokens; cache reads at `cached_input`, cache writes at
    `cache_write` (None: the input price, as where writes cost nothing extra)."""

    input: float
    output: float
    cached_input: float
    cache_write: float | None = None
    # Prices on other service tiers, by the name the provider reports.
    tiers: dict[str, Price] = field(default_factory=dict, compare=False)

    def on_tier(self, tier: str | None) -> Price:
        """The price on the service tier that served a call (this one when unknown)."""
        return self.tiers.get(tier, self) if tier is not None else self

    def cost(self, usage: Usage) -> float:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        uncached = usage.prompt_tokens - cached - written
        write_price = self.cache_write if self.cache_write is not None else self.input
        return (
            uncached * self.input
            + cached * self.cached_input
            + written * write_price
            + usage.output_tokens * self.output
        ) / 1_000_000


@dataclass(frozen=True)
class ProviderSettings:
    """Everything an adapter needs to talk to one model; the key never prints."""

    name: str
    preset: ProviderPreset
    model: str
    base_url: str | None
    api_key_env: str | None
    params: dict[str, Any]
    price: Price | None
    api_key: str | None = field(default=None, repr=False)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    schema: OutputSchema | None = None
    batch_price: Price | None = None
    prompt_cache: bool | str = False  # mark the stable prefix cacheable (a str: the key)
    context_window: int | None = None  # None: unknown, so nothing is checked locally

    @property
    def needs_key(self) -> bool:
        return self.api_key_env is not None


def config_dir() -> Path:
    """Where presets live: $PIPELINE_CONFIG_DIR, the source tree, or the installed copy."""
    override = os.environ.get("PIPELINE_CONFIG_DIR")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "configs", package / "_configs"):
        if candidate.is_dir():
            return candidate
    raise SpecError("cannot find the configs/ folder; set PIPELINE_CONFIG_DIR to it")


def available_providers(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((folder or config_dir()) / "providers").glob("*.yaml"))


def load_preset(name: str) -> ProviderPreset:
    return _load_preset(config_dir(), name)


def load_prices() -> dict[str, Pricing]:
    return _load_prices(config_dir())


def load_context_windows() -> dict[str, int]:
    return _load_context_windows(config_dir())


def context_window(model: ModelSpec) -> int | None:
    """Tokens the model takes in one request: the job's `model.context_window`, else its
    entry in pricing.yaml; None when neither knows it."""
    return model.context_window or load_context_windows().get(model.model)


# Cached per folder, so pointing PIPELINE_CONFIG_DIR elsewhere reads that folder's files.
@cache
def _load_preset(folder: Path, name: str) -> ProviderPreset:
    path = folder / "providers" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_providers(folder))
        raise SpecError(f"model.provider: unknown provider '{name}' (known: {known})")
    try:
        return ProviderPreset.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as exc:
        raise SpecError(f"{path}: invalid provider preset: {exc}") from None


# pricing.yaml holds each model's facts: its prices, and its context window, which is
# no price (a job's `model.pricing` does not take it) and is read apart from them.
WINDOW_KEY = "context_window"


@cache
def _model_entries(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / "pricing.yaml"
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or not all(isinstance(e, dict) for e in raw.values()):
        raise SpecError(f"{path}: expected a mapping of model name to its entry")
    return raw


@cache
def _load_prices(folder: Path) -> dict[str, Pricing]:
    entries = _model_entries(folder)
    try:
        return {
            model: Pricing.model_validate({k: v for k, v in entry.items() if k != WINDOW_KEY})
            for model, entry in entries.items()
        }
    except ValidationError as exc:
        raise SpecError(f"{folder / 'pricing.yaml'}: invalid price entry: {exc}") from None


@cache
def _load_context_windows(folder: Path) -> dict[str, int]:
    windows = {}
    for model, entry in _model_entries(folder).items():
        window = entry.get(WINDOW_KEY)
        if window is None:
            continue
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise SpecError(
                f"{folder / 'pricing.yaml'}: {model}.{WINDOW_KEY}: expected a whole number "
                f"of tokens above 0, got {window!r}"
            )
        windows[model] = window
    return windows


def resolve_price(model: ModelSpec) -> Price | None:
    pricing = model.pricing or load_prices().get(model.model)
    if pricing is None:
        return None
    return Price(
        input=pricing.input,
        output=pricing.output,
        cached_input=_or(pricing.cached_input, pricing.input),
        cache_write=pricing.cache_write,
        tiers={
            name: Price(
                input=tier.input,
                output=tier.output,
                cached_input=_or(tier.cached_input, tier.input),
                cache_write=tier.cache_write,
            )
            for name, tier in (pricing.service_tiers or {}).items()
        },
    )


def _or(value: float | None, fallback: float) -> float:
    return value if value is not None else fallback


def resolve_batch_price(model: ModelSpec, preset: ProviderPreset) -> Price | None:
    """USD per million tokens through the batch API: pricing.yaml's batch prices, else
    the online prices times the preset's discount; None when neither is known."""
    pricing = model.pricing or load_prices().get(model.model)
    if pricing is None:
        return None
    online = resolve_price(model)
    assert online is not None
    factor = preset.batch_discount
    explicit = (pricing.batch_input, pricing.batch_output)
    if None in explicit and factor is None:
        return None

    def pick(value: float | None, fallback: float) -> float:
        return value if value is not None else fallback * (factor or 1.0)

    return Price(
        input=pick(pricing.batch_input, online.input),
        output=pick(pricing.batch_output, online.output),
        cached_input=pick(pricing.batch_cached_input, online.cached_input),
        cache_write=None if online.cache_write is None else pick(None, online.cache_write),
    )


def thinking_on(params: dict[str, Any]) -> bool:
    thinking = params.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def forces_a_tool(tool_choice: str | dict[str, Any] | None) -> bool:
    """`required`, `any`, or one named tool: the model may not answer in text."""
    if isinstance(tool_choice, str):
        return tool_choice in ("required", "any")
    return isinstance(tool_choice, dict) and tool_choice.get("type") in ("function", "tool", "any")


def refuse_forced_tool_with_thinking(
    model: ModelSpec, preset: ProviderPreset, schema: OutputSchema | None
) -> None:
    """A SpecError for a job the provider would reject on every row: thinking with a
    forced tool call (which is also how output.schema is asked for on such providers)."""
    params = {**preset.default_params, **model.params}
    if not preset.thinking_forbids_forced_tool or not thinking_on(params):
        return
    if schema is not None and preset.structured_output == "tool":
        raise SpecError(
            f"model.params.thinking with output.schema: provider '{model.provider}' returns "
            "a schema's answer as a forced tool call, which it rejects while thinking is on; "
            "remove model.params.thinking, or remove output.schema and ask for JSON in "
            "the prompt"
        )
    if forces_a_tool(model.tool_choice):
        raise SpecError(
            f"model.tool_choice {model.tool_choice!r} with model.params.thinking: provider "
            f"'{model.provider}' rejects a forced tool call while thinking is on; set "
            "tool_choice to auto (or remove it), or remove model.params.thinking"
        )


def resolve_provider(
    model: ModelSpec,
    *,
    read_key: bool | Literal["if_set"] = True,
    schema: OutputSchema | None = None,
) -> ProviderSettings:
    """Merge preset and job; with `read_key`, require the key variable to be set
    ("if_set": use it when it is, for calls that can do without)."""
    preset = load_preset(model.provider)
    if refused := preset.refused_by(model.model, model.params):
        # Better a warning now than a night of failed rows.
        warnings.warn(
            f"model.params: {', '.join(refused)} may be rejected by {model.model} "
            f"(see refused_params in the '{model.provider}' preset)",
            SpecWarning,
            stacklevel=2,
        )
    refuse_forced_tool_with_thinking(model, preset, schema)
    # An explicit `api_key_env: null` means "this server needs no key".
    explicit = "api_key_env" in model.model_fields_set
    key_env = model.api_key_env if explicit else preset.api_key_env
    api_key = None
    if key_env and read_key:
        api_key = os.environ.get(key_env)
        if not api_key and read_key != "if_set":
            raise SpecError(
                f"model.api_key_env: environment variable {key_env} is not set; "
                f"export {key_env}=<your key> (provider '{model.provider}' needs a key)"
            )
    return ProviderSettings(
        name=model.provider,
        preset=preset,
        model=model.model,
        base_url=model.base_url or preset.base_url,
        api_key_env=key_env,
        params={**preset.default_params, **model.params},
        price=resolve_price(model),
        api_key=api_key,
        stream=model.stream,
        tools=model.tools,
        tool_choice=model.tool_choice,
        schema=schema,
        batch_price=resolve_batch_price(model, preset),
        prompt_cache=model.prompt_cache,
        context_window=context_window(model),
    )
