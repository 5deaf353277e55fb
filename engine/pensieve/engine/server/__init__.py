"""Pensieve's OpenAI-compatible HTTP server with sessions (aiohttp).

    python -m pensieve.engine serve --model DIR [--api-key KEY ...] [--port 8000]

``run_server(args)`` is the CLI entry; ``serve(engine, config)`` runs an
already-built engine (tests and embedding). See app.py for the endpoints.
"""
from .config import ServerConfig
from .main import run_server, serve, start_server

__all__ = ["ServerConfig", "run_server", "serve", "start_server"]
