"""/metrics in the Prometheus text format: every contract name is present
(parsed with prometheus_client's parser) and the counters move as requests are served."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import MODEL

# docs/design.md, "Engine metrics": names are a contract (tests/test_design_contract.py checks the document).
GAUGES = ["pensieve_num_requests_running", "pensieve_num_requests_waiting", "pensieve_num_requests_swapped",
          "pensieve_gpu_cache_usage_ratio", "pensieve_cpu_cache_usage_ratio", "pensieve_gpu_cache_blocks",
          "pensieve_cpu_cache_blocks", "pensieve_sessions_active"]
COUNTERS = {"pensieve_prompt_tokens_total": None, "pensieve_generation_tokens_total": None,
            "pensieve_context_tokens_total": ("source", {"gpu", "cpu", "recomputed", "new"}),
            "pensieve_swap_bytes_total": ("direction", {"in", "out"}),
            "pensieve_evicted_tokens_total": ("tier", {"gpu", "cpu"}),
            "pensieve_swap_out_in_step_bytes_total": None,
            "pensieve_engine_steps_total": ("path", {"graph", "eager", "eager_for_copies"}),
            "pensieve_requests_total": ("status", {"stop", "length", "abort"})}
HISTOGRAMS = ["pensieve_time_to_first_token_seconds", "pensieve_inter_token_latency_seconds",
              "pensieve_request_latency_seconds"]
INFO_LABELS = {"model", "block_size", "gpu_blocks", "cpu_blocks", "cache_mode"}


def scrape(server) -> dict[tuple, float]:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    samples = {}
    types = {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    samples[("__types__", ())] = types
    return samples


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_contract_names_present(server):
    m = scrape(server)
    types = m[("__types__", ())]
    names = {k[0] for k in m}
    for g in GAUGES:
        assert g in names and types[g] == "gauge", g
    for c, lab in COUNTERS.items():
        assert types[c[: -len("_total")]] == "counter", c
        if lab is None:
            assert c in names, c
        else:
            key, values = lab
            got = {dict(k[1]).get(key) for k in m if k[0] == c}
            assert values <= got, (c, got)
    for h in HISTOGRAMS:
        assert types[h] == "histogram"
        assert f"{h}_bucket" in names and f"{h}_count" in names and f"{h}_sum" in names
    info = [dict(k[1]) for k in m if k[0] == "pensieve_cache_config_info"]
    assert len(info) == 1 and INFO_LABELS <= set(info[0])
    assert info[0]["model"] == MODEL and info[0]["block_size"] == "32" and info[0]["gpu_blocks"] == "64"
    assert info[0]["cache_mode"] == "pensieve"


def test_vllm_named_aliases_for_the_inference_gateway(server):
    """The endpoint picker of the Gateway API Inference Extension reads vLLM's names."""
    m = scrape(server)
    types = m[("__types__", ())]
    for alias, ours in [("vllm:num_requests_waiting", "pensieve_num_requests_waiting"),
                        ("vllm:num_requests_running", "pensieve_num_requests_running"),
                        ("vllm:num_requests_swapped", "pensieve_num_requests_swapped"),
                        ("vllm:gpu_cache_usage_perc", "pensieve_gpu_cache_usage_ratio"),
                        ("vllm:kv_cache_usage_perc", "pensieve_gpu_cache_usage_ratio")]:
        assert types[alias] == "gauge", alias
        assert value(m, alias) == value(m, ours), alias
    (info,) = [dict(k[1]) for k in m if k[0] == "vllm:cache_config_info"]
    assert info == {"block_size": "32", "num_gpu_blocks": "64", "num_cpu_blocks": info["num_cpu_blocks"]}
    assert 0 <= value(m, "vllm:kv_cache_usage_perc") <= 1


def test_metrics_move_as_requests_are_served(server):
    server.wait_idle()
    before = scrape(server)
    sid = "metrics-session"
    msgs = [{"role": "user", "content": "what is a paged cache"}]
    h = server.headers(**{"X-Session-ID": sid})
    r1 = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                    json={"model": MODEL, "messages": msgs, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    u1 = r1.json()["usage"]
    msgs += [r1.json()["choices"][0]["message"], {"role": "user", "content": "and why keep it"}]
    r2 = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                    json={"model": MODEL, "messages": msgs, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                          "stream": True})
    assert r2.status_code == 200 and r2.text.endswith("data: [DONE]\n\n")
    server.wait_idle()
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pensieve_generation_tokens_total") == 10
    assert delta("pensieve_prompt_tokens_total") >= u1["prompt_tokens"] * 2
    assert delta("pensieve_context_tokens_total", source="new") > 0
    assert delta("pensieve_context_tokens_total", source="gpu") > 0  # turn 2 came partly from cache
    assert (delta("pensieve_context_tokens_total", source="gpu") + delta("pensieve_context_tokens_total", source="new")
            == delta("pensieve_prompt_tokens_total"))
    assert delta("pensieve_requests_total", status="length") == 2
    assert delta("pensieve_time_to_first_token_seconds_count") == 2
    assert delta("pensieve_request_latency_seconds_count") == 2
    assert delta("pensieve_inter_token_latency_seconds_count") == 8
    # on the CPU every step runs eagerly: two prompts and at least 8 decode steps (fewer when
    # prefill steps are shared), none held back by copies, none in-step swapped out
    assert delta("pensieve_engine_steps_total", path="eager") >= 10
    assert delta("pensieve_engine_steps_total", path="graph") == 0
    assert delta("pensieve_engine_steps_total", path="eager_for_copies") == 0
    assert delta("pensieve_swap_out_in_step_bytes_total") == 0
    assert value(after, "pensieve_sessions_active") >= 1
    assert value(after, "pensieve_gpu_cache_blocks") >= 1  # the session's cache
    assert 0 < value(after, "pensieve_gpu_cache_usage_ratio") <= 1
    # refused requests count under their status code
    bad = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), json={"model": MODEL}, timeout=10)
    assert bad.status_code == 400
    assert value(scrape(server), "pensieve_requests_total", status="400") >= 1
    httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=server.headers(), timeout=10)
