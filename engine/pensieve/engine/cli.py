"""Command line: ``python -m pensieve.engine {generate,serve,chat,tiny} ...``.

Flags come from the config dataclasses (one flag per field, each also read
from ``PENSIEVE_<FLAG>``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import EngineConfig, add_dataclass_args, dataclass_from_args
from .errors import PensieveError
from .server.config import ServerConfig


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import LLMEngine
    from .sampling import SamplingParams

    config = dataclass_from_args(EngineConfig, args)
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.request_seed, stop=args.stop or [])
    prompt = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                print(f"[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} generated, "
                      f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import HTTPChat, LocalChat, new_session_id, repl

    sid = args.session_id or new_session_id()
    if args.url:
        if args.model:
            print("error: give --url (a running server) or --model (in-process), not both", file=sys.stderr)
            return 2
        chat = HTTPChat(args.url, args.api_key, sid, args.system, args.max_tokens, args.temperature)
    else:
        from .engine import LLMEngine

        config = dataclass_from_args(EngineConfig, args)
        if not config.model:
            print("error: give --url URL (a running server) or --model PATH (a checkpoint)", file=sys.stderr)
            return 2
        print(f"loading {config.model} ...", file=sys.stderr)
        logging.getLogger().setLevel(logging.WARNING)  # keep the conversation readable
        chat = LocalChat(LLMEngine(config), sid, args.system, args.max_tokens, args.temperature)
    return repl(chat)


def cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.out, args.family, seed=args.seed_weights)
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pensieve.engine", description="Pensieve stateful LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from one prompt and print the text")
    add_dataclass_args(gen, EngineConfig)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--request-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with sessions")
    add_dataclass_args(serve, EngineConfig)
    add_dataclass_args(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive terminal chat: one session, streamed replies, where each "
                                       "turn's context came from")
    chat.add_argument("--url", help="a running server (http://host:port); without it, --model runs in-process")
    chat.add_argument("--api-key", dest="api_key", default=os.environ.get("PENSIEVE_CHAT_API_KEY"),
                      help="bearer key for --url [env PENSIEVE_CHAT_API_KEY]")
    chat.add_argument("--session-id", help="session to use (default: a new random one)")
    chat.add_argument("--system", help="system message of the conversation")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_dataclass_args(chat, EngineConfig)
    chat.set_defaults(func=cmd_chat)

    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint (tests, demo)")
    tiny.add_argument("--family", choices=("llama", "qwen2", "mistral", "opt"), default="llama")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed-weights", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PensieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
