"""kvkeep's OpenAI-compatible server over the engine (``kvkeep serve``; needs ``kvkeep[serve]``)."""

from .app import create_app

__all__ = ["create_app"]
