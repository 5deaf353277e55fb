#!/usr/bin/env bash
# The README's main command: on a fresh machine, set up the environment, build a
# tiny checkpoint, start the Pensieve server on the CPU, hold a short multi-turn
# conversation over HTTP (the official openai client, streaming), print each
# turn's time to first token and where its context came from (the session's
# cache or newly computed), then stop the server (SIGTERM: it drains, exits 0).
#
#   bash scripts/demo.sh            # PENSIEVE_DEMO_PORT=8000 by default
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"

work="$(mktemp -d "${TMPDIR:-/tmp}/pensieve-demo.XXXXXX")"
port="${PENSIEVE_DEMO_PORT:-$("$PENSIEVE_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -TERM "$server_pid"; wait "$server_pid" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== building a tiny checkpoint (random weights, trained tokenizer, chat template)"
"$PENSIEVE_PY" -m pensieve.engine tiny --family llama --out "$work/tiny-llama" 2>/dev/null >/dev/null

echo "== starting the server on 127.0.0.1:$port (CPU; log: server.log below on failure)"
"$PENSIEVE_PY" -m pensieve.engine serve --model "$work/tiny-llama" --device cpu --host 127.0.0.1 --port "$port" \
    --api-key demo-key >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
    if "$PENSIEVE_PY" -c "import sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=1)" 2>/dev/null; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$work/server.log"; exit 1; fi
    sleep 0.2
done

echo "== a conversation of 4 turns in one session (X-Session-ID: demo-chat, session_mode append)"
"$PENSIEVE_PY" - "$port" <<'PY'
import sys, time, urllib.request

import openai

port = sys.argv[1]
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo-key", max_retries=0)
model = client.models.list().data[0].id
system = ("You are the assistant of a cluster operator. " +
          "The cache keeps each conversation between turns so new tokens only are computed. " * 12)
turns = [
    [{"role": "system", "content": system}, {"role": "user", "content": "What does the GPU tier hold?"}],
    [{"role": "user", "content": "And what happens when it is full?"}],
    [{"role": "user", "content": "Why are leading chunks dropped first?"}],
    [{"role": "user", "content": "Thanks. Can you tell me about swap?"}],
]
print(f"{'turn':>4} {'TTFT ms':>8} {'prompt':>7} {'cached':>7} {'new':>5} {'output':>7}  reply (random weights: arbitrary text)")
for i, messages in enumerate(turns, 1):
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Session-ID": "demo-chat"},
        extra_body={"session_mode": "append"})
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(c.delta.content)
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
    cached = usage.prompt_tokens_details.cached_tokens
    reply = "".join(text).replace("\n", " ")
    print(f"{i:>4} {1000 * (ttft or 0):>8.1f} {usage.prompt_tokens:>7} {cached:>7} {usage.prompt_tokens - cached:>5} "
          f"{usage.completion_tokens:>7}  {reply[:40]!r}")

metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
print("\nwhere the prompt tokens came from (pensieve_context_tokens_total):")
for line in metrics.splitlines():
    if line.startswith("pensieve_context_tokens_total{"):
        print("  " + line)
session = client.get("/sessions/demo-chat", cast_to=object)
print(f"session demo-chat: {session['num_turns']} turns, {session['cached_tokens']} tokens cached in "
      f"{session['cached_blocks']} blocks")
PY

echo "== stopping the server (SIGTERM: drain, exit 0)"
kill -TERM "$server_pid"
rc=0; wait "$server_pid" || rc=$?
server_pid=""
echo "server exited with $rc"
exit "$rc"
