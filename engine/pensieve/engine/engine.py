"""The in-process engine: add requests, step, read streamed outputs.

    engine = LLMEngine(EngineConfig(model="/path/to/ckpt"))
    rid = engine.add_request("Hello", SamplingParams(max_tokens=8, temperature=0), session_id="chat-1")
    while engine.has_unfinished():
        for out in engine.step():
            print(out.new_text, end="")

The engine is single-threaded: one thread calls every method (the HTTP
server runs it in its own thread and hands requests over through a queue).
Each step is schedule -> run -> update.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .cache_manager import CacheManager, common_prefix_len
from .checkpoint import checkpoint_dtype, load_tokenizer, read_config
from .config import EngineConfig, parse_bytes
from .cost_model import CostModel, load_or_profile, profile_cache_path
from .detokenizer import IncrementalDetokenizer
from .errors import ContextLengthExceededError, InvalidRequestError, SessionBusyError
from .request import Request, RequestOutput, RequestStatus, Session, SessionKey
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, SchedulerOutput

log = logging.getLogger("pensieve.engine")

@dataclass
class EngineStats:
    """Monotonic counters (the server exports them as Prometheus metrics)."""

    prompt_tokens: int = 0          # prompt tokens of admitted requests
    cached_prompt_tokens: int = 0   # of those, found in the session's cache
    computed_tokens: int = 0        # tokens that went through the model (prefill, recompute, decode)
    generation_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if not config.model:
            raise InvalidRequestError("no model given (--model DIR)", "model")
        self.config = config
        self.model_config = read_config(config.model)
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.model_config, self.device)
        self.max_model_len = _max_model_len(config, self.model_config)
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = _eos_ids(config.model, self.model_config, self.tokenizer)
        self.served_model_name = config.served_model_name or config.model.rstrip("/").split("/")[-1]
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config, self.device, self.dtype)
        num_blocks = config.num_gpu_blocks or self.runner.profile_num_blocks(self.max_model_len)
        self.runner.allocate_cache(num_blocks)
        self.cost_model = self._cost_model(num_blocks)
        num_cpu_blocks = self._num_cpu_blocks(num_blocks)
        self.runner.allocate_cpu_cache(num_cpu_blocks)
        self.cache = CacheManager(num_blocks, config.block_size, config.cache_mode, config.eviction,
                                  num_cpu_blocks=num_cpu_blocks, cost_model=self.cost_model)
        self.scheduler = Scheduler(self.cache, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        log.info("engine ready: %s on %s (%s), %d GPU-tier + %d CPU-tier blocks of %d tokens (%.2f MiB each), "
                 "max_model_len %d, cache mode %s, eviction %s (cost: %s)",
                 self.model_config["architecture"], self.device, str(self.dtype).replace("torch.", ""),
                 num_blocks, num_cpu_blocks, config.block_size, self.runner.bytes_per_block / 2**20,
                 self.max_model_len, config.cache_mode, config.eviction, self.cost_model.source)

    # ---------------------------------------------------------------- API
    @property
    def num_gpu_blocks(self) -> int:
        return self.cache.gpu.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cache.cpu.num_blocks

    def swap_bytes(self, direction: str) -> int:
        blocks = self.cache.stats.swap_in_blocks if direction == "in" else self.cache.stats.swap_out_blocks
        return blocks * self.runner.bytes_per_block

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render messages with the checkpoint's chat template and tokenize."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, session_id: str | None = None,
                    owner: str | None = None, history: list[int] | None = None) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError (and
        subclasses) for bad input, leaving the engine untouched.

        The session is ``(owner, session_id)``: another owner's session of the same id is
        a different session. ``history`` is the conversation's token history as the
        caller's session store last recorded it; the prompt's prefix that matches it and
        that this engine's cache does not hold is counted (and reported) as recomputed."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(token_ids)} (at least one token must be left to generate)")
        max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        blocks_needed = -(-(len(token_ids) + max_tokens) // self.config.block_size)
        if blocks_needed > self.num_gpu_blocks:
            raise ContextLengthExceededError(
                f"prompt plus max_tokens needs {blocks_needed} KV blocks; the cache has {self.num_gpu_blocks}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        session = None
        if session_id is not None:
            if not isinstance(session_id, str) or not session_id:
                raise InvalidRequestError("session_id must be a non-empty string", "session_id")
            session = self.cache.sessions.get(SessionKey(owner, session_id))
            if session is not None and session.active_request is not None:
                raise SessionBusyError(session_id)
            session = session or self.cache.get_or_create_session(session_id, owner)
            session.active_request = request_id
            session.last_active = time.monotonic()
            session.num_turns += 1
        req = Request(request_id, list(token_ids), len(token_ids), params, max_tokens, session=session)
        if history:
            req.stored_context = common_prefix_len(history, req.token_ids)
        seed = params.seed
        if seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free what it holds (its computed context stays in its session)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One scheduler step: schedule -> run -> update. Returns the outputs of this step."""
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if sched.is_empty:
            return []
        logits = self.runner.execute(sched)
        self.cache.finish_step()
        if logits is None:
            return []
        return self._update(sched, logits)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; returns each one's output token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[i] for i in ids]

    def delete_session(self, session_id: str | SessionKey, owner: str | None = None) -> RequestOutput | None:
        """Forget a session and its cache; a turn still running is aborted and its final output returned."""
        s = self.get_session(session_id, owner)
        out = self.abort(s.active_request) if s.active_request is not None else None
        self.cache.delete_session(s.key)
        return out

    def expire_idle_sessions(self) -> list[SessionKey]:
        """Forget the cache of sessions idle longer than ``session_idle_timeout``; returns their keys."""
        ttl = self.config.session_idle_timeout
        if ttl <= 0:
            return []
        now = self.cache.clock()
        expired = [sid for sid, s in self.cache.sessions.items()
                   if s.active_request is None and not s.internal and now - s.last_active > ttl]
        for sid in expired:
            self.cache.delete_session(sid)
        if expired:
            log.info("expired %d idle session(s)", len(expired))
        return expired

    def offload_session(self, session_id: str | SessionKey, owner: str | None = None) -> int:
        """Copy an idle session's context to the CPU tier and free its GPU blocks, now."""
        moved = self.cache.offload(session_id, owner)
        self.runner.execute(SchedulerOutput(swaps=self.cache.take_plan()))
        self.cache.finish_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return moved

    def get_session(self, session_id: str | SessionKey, owner: str | None = None) -> Session:
        """The session ``(owner, session_id)`` (or a SessionKey); UnknownSessionError if this engine
        holds none. Another owner's session of the same id is simply a different, unknown one."""
        return self.cache.get_session(session_id, owner)

    # ---------------------------------------------------------------- internals
    def _cost_model(self, num_gpu_blocks: int) -> CostModel:
        """Measured chunk costs on CUDA (cached on disk), the analytic FLOP count elsewhere."""
        analytic = CostModel.analytic(self.model_config, self.config.block_size, self.max_model_len)
        if self.device.type != "cuda" or self.config.cache_mode != "pensieve" or self.config.eviction != "retention":
            return analytic
        name = torch.cuda.get_device_name(self.device)
        path = profile_cache_path(self.model_config, name, str(self.dtype), self.config.block_size)
        # The last profiled chunk must end inside the context.
        limit = min(self.max_model_len, (num_gpu_blocks - 2) * self.config.block_size) - self.config.block_size
        try:
            return load_or_profile(path, self.runner.time_chunk, limit)
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("chunk cost profile failed (%s); using the analytic cost", e)
            return analytic

    def _num_cpu_blocks(self, num_gpu_blocks: int) -> int:
        config = self.config
        if config.cache_mode != "pensieve":
            return 0
        if config.num_cpu_blocks is not None:
            return config.num_cpu_blocks
        per_block = self.runner.bytes_per_block
        if config.cpu_cache_bytes != "auto":
            return parse_bytes(config.cpu_cache_bytes) // per_block
        limit = host_memory_limit()
        weights = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        on_host = weights + num_gpu_blocks * per_block if self.device.type == "cpu" else 0
        reserve = max(4 << 30, limit // 5) + on_host
        return max(0, (limit - reserve) // per_block)

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            vocab = self.model_config["vocab_size"]
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        return ids

    def _update(self, sched: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_batched_tokens
        sampling = [c for c in sched.chunks if c.samples]
        tokens = self.sampler(logits, [c.request.params for c in sampling], [c.request.generator for c in sampling])
        for chunk in sched.chunks:
            if chunk.recompute:
                chunk.request.recompute_pos += chunk.num_tokens
            else:
                chunk.request.num_computed_tokens += chunk.num_tokens
        outputs = []
        now = time.monotonic()
        for chunk, token in zip(sampling, tokens):
            req = chunk.request
            if req.num_output_tokens == 0 and req.first_token_time is None:
                req.first_token_time = now
                self.stats.prompt_tokens += req.num_prompt_tokens
                self.stats.cached_prompt_tokens += req.num_cached_tokens
            req.token_ids.append(token)
            self.stats.generation_tokens += 1
            outputs.append(self._emit(req, token))
        return outputs

    def _emit(self, req: Request, token: int) -> RequestOutput:
        params = req.params
        reason = None
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        if not stop_token:
            req.output_text += req.detokenizer.step(req.token_ids)
        if stop_token:
            reason = "stop"
        elif params.stop:
            hit = _find_stop(req.output_text, params.stop, max(0, req.emitted_text_len - 256))
            if hit is not None:
                req.output_text = req.output_text[:hit]
                reason = "stop"
        if reason is None and (req.num_output_tokens >= req.max_tokens):
            reason = "length"
        # Hold back a tail that could still grow into a stop string.
        release = len(req.output_text) if reason else len(req.output_text) - _stop_prefix_len(req.output_text, params.stop)
        new_text = req.output_text[req.emitted_text_len:release]
        req.emitted_text_len = max(req.emitted_text_len, release)
        if reason is not None:
            return self._finish(req, reason, new_token_ids=[token], new_text=new_text)
        return self._output(req, [token], new_text, finished=False)

    def _finish(self, req: Request, reason: str, new_token_ids=(), new_text: str = "") -> RequestOutput:
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if not new_text and req.emitted_text_len < len(req.output_text) and reason != "abort":
            new_text = req.output_text[req.emitted_text_len:]
        self.cache.release(req)
        self.requests.pop(req.request_id, None)
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
        return self._output(req, list(new_token_ids), new_text, finished=True)

    def _output(self, req: Request, token_ids: list[int], text: str, finished: bool) -> RequestOutput:
        return RequestOutput(req.request_id, token_ids, text, finished, req.finish_reason, req.num_prompt_tokens,
                             req.num_cached_tokens, req.num_output_tokens,
                             req.session.session_id if req.session else None, req.num_recomputed_tokens)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda but no CUDA device is visible", "device")
    return torch.device(name)


def _pick_dtype(name: str, cfg: dict, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    ckpt = checkpoint_dtype(cfg)
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def _max_model_len(config: EngineConfig, cfg: dict) -> int:
    limit = cfg.get("max_position_embeddings") or 2048
    window = cfg.get("sliding_window")
    if window and cfg["architecture"] == "MistralForCausalLM":
        # Attention here is full, not windowed: stay within the window so outputs are exact.
        limit = min(limit, window)
    if config.max_model_len:
        if config.max_model_len > limit:
            raise InvalidRequestError(f"--max-model-len {config.max_model_len} exceeds the model's limit {limit}",
                                      "max_model_len")
        return config.max_model_len
    return limit


def _eos_ids(model_dir: str, cfg: dict, tokenizer) -> set[int]:
    import json
    from pathlib import Path

    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    sources = [cfg.get("eos_token_id")]
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            log.warning("%s: not valid JSON, ignored", gen)
    sources.append(tokenizer.eos_token_id)
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(x for x in s if isinstance(x, int))
    return ids


def host_memory_limit() -> int:
    """The container's cgroup memory limit, or the host's memory when unlimited."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < host:
            return int(raw)
    return host
