"""Which providers have a batch API: read from the provider presets, never from names."""

from __future__ import annotations

from fnmatch import fnmatch

from pipeline.config import ProviderPreset, available_providers, load_preset
from pipeline.errors import SpecError
from pipeline.spec import ModelSpec


def providers_with_batch_api() -> dict[str, ProviderPreset]:
    """Every preset in configs/providers/ that names a batch API."""
    found: dict[str, ProviderPreset] = {}
    for name in available_providers():
        try:
            preset = load_preset(name)
        except SpecError:
            continue
        if preset.batch_api is not None:
            found[name] = preset
    return found


def serves_model(preset: ProviderPreset, model: str) -> bool:
    """Whether the preset's batch models (glob patterns) include this model name."""
    return any(fnmatch(model, pattern) for pattern in preset.batch_models)


def require_batch_api(model: ModelSpec, preset: ProviderPreset) -> None:
    """Refuse `model.batch` for a provider without a batch API, naming those with one."""
    if not model.batch or preset.batch_api is not None:
        return
    others = providers_with_batch_api()
    for_model = sorted(name for name, p in others.items() if serves_model(p, model.model))
    hint = f"; for {model.model}: {', '.join(for_model)}" if for_model else ""
    raise SpecError(
        f"model.batch: provider '{model.provider}' has no batch API. Providers with one: "
        f"{', '.join(sorted(others))}{hint}. Set model.provider to one of them, or remove "
        "model.batch (and --batch) to send requests online"
    )
