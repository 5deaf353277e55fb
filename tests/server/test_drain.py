"""SIGTERM while a stream is in flight: the stream completes, /ready turns
false, new requests get 503, and the process exits 0."""
from __future__ import annotations

import json
import signal

import httpx
import pytest

from server_helpers import KEY1, KEY2, MODEL, start_server, stop_server


@pytest.fixture(scope="module")
def drain_server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("drain") / "server.log"
    srv = start_server(tiny_ckpt, log, "--api-key", KEY1, "--api-key", KEY2, "--drain-timeout", "60")
    yield srv
    stop_server(srv)


def test_sigterm_drains(drain_server):
    srv = drain_server
    h = srv.headers(KEY2)  # the second repeated --api-key works too
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long answer please"}], "max_tokens": 900,
            "temperature": 0, "ignore_eos": True, "stream": True}
    chunks, done, finish = 0, False, None
    with httpx.Client(timeout=60) as client, client.stream("POST", srv.url + "/v1/chat/completions", headers=h,
                                                           json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 3:
                    break
        srv.proc.send_signal(signal.SIGTERM)
        # while the stream is still running:
        with httpx.Client(timeout=10) as other:
            ready = other.get(srv.url + "/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert other.get(srv.url + "/health").status_code == 200
            new = other.post(srv.url + "/v1/chat/completions", headers=h,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert new.status_code == 503 and new.json()["error"]["code"] == "draining"
            assert srv.proc.poll() is None  # still serving the stream
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                chunks += 1
                obj = json.loads(line[6:])
                if obj["choices"] and obj["choices"][0]["finish_reason"]:
                    finish = obj["choices"][0]["finish_reason"]
                    assert obj["usage"]["completion_tokens"] == 900
    assert done and finish == "length"
    assert srv.proc.wait(30) == 0
    assert "drained" in srv.log.read_text()
