"""The OpenAI-compatible HTTP server (needs the `server` extra)."""

from coe.server.app import create_app

__all__ = ["create_app"]
