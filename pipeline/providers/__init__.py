"""Wire-protocol adapters. Importing this package registers the built-in ones."""

from pipeline.providers import anthropic as _anthropic  # noqa: F401  (registers "anthropic")
from pipeline.providers import openai as _openai  # noqa: F401  (registers "openai")
from pipeline.providers.base import Provider, create_provider, register

__all__ = ["Provider", "create_provider", "register"]
