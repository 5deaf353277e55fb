"""The in-process engine: add requests, step, read streamed outputs.

    engine = LLMEngine(EngineConfig(model="/path/to/ckpt"))
    rid = engine.add_request("Hello", SamplingParams(max_tokens=8, temperature=0), session_id="chat-1")
    while engine.has_unfinished():
        for out in engine.step():
            print(out.new_text, end="")

The engine is single-threaded: one thread calls every method (``serve`` runs
it in an engine process of its own, or with ``--engine-process off`` in a
thread; server/engine_loop.py is that loop). Text and stop strings: see
detokenizer.py (the server makes them itself; the engine makes them for
in-process callers that ask).
Each step is schedule -> run -> update.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field

import torch

from pensieve.common.memory import cpu_tier_bytes, engine_overhead_bytes, usable_memory

from .cache_manager import CacheManager, stored_context_len
from .checkpoint import checkpoint_dtype, load_tokenizer, read_config
from .config import EngineConfig
from .cost_model import CostModel, load_or_profile, profile_cache_path
from .detokenizer import TextStream
from .errors import ContextLengthExceededError, InvalidRequestError
from .pinned import PinnedPair
from .prompt import PromptEncoder
from .request import Request, RequestOutput, RequestStatus, Session, SessionKey
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .tp_worker import agree_gpu_blocks, start_group

log = logging.getLogger("pensieve.engine")

@dataclass
class StepInfo:
    """What the step collected last computed (benchmarks and metrics read it)."""

    tokens: int          # query tokens through the model
    seqs: int            # chunks (a request recomputing dropped tokens counts twice)
    decode_only: bool    # every chunk is one new token
    context: int         # keys attended in all, summed over chunks (KV tokens read)
    pairs: int           # causal (query, key) pairs: the attention work
    wait_s: float = 0.0  # host time spent waiting for this step's tokens (0: the host was the bottleneck)
    launch_s: float = 0.0  # host time to prepare and enqueue it (a sync hidden in there shows up here)
    execute_s: float = 0.0  # of which the runner (inputs, swaps, forward pass): the rest is sampling and Python
    schedule_s: float = 0.0  # host time the scheduler took to decide it (cache tiers included)

    @classmethod
    def of(cls, sched: SchedulerOutput) -> "StepInfo":
        chunks = sched.chunks
        context = sum(c.start + c.num_tokens for c in chunks)
        pairs = sum(c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2 for c in chunks)
        return cls(sched.num_batched_tokens, len(chunks), all(c.num_tokens == 1 for c in chunks), context, pairs)


@dataclass
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    info: StepInfo
    rows: list[tuple[Request, int]]      # (request, position of its placeholder), in sample order
    tokens: torch.Tensor                 # sampled ids on the device (the next step reads them there)
    host: torch.Tensor                   # their copy on the host (pinned on CUDA), valid after event
    event: object | None                 # CUDA event recorded after the copy (None on CPU)


def _to_host(tokens: torch.Tensor, pinned: PinnedPair) -> tuple[torch.Tensor, object | None]:
    if tokens.device.type != "cuda":
        return tokens, None
    host = pinned.next(tokens.numel())
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class EngineStats:
    """Monotonic counters (the server exports them as Prometheus metrics)."""

    prompt_tokens: int = 0          # prompt tokens of admitted requests
    cached_prompt_tokens: int = 0   # of those, found in the session's cache
    computed_tokens: int = 0        # tokens that went through the model (prefill, recompute, decode)
    generation_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    step_paths: dict[str, int] = field(default_factory=dict)  # steps by ModelRunner.last_path
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
        self.prompts = PromptEncoder(self.tokenizer, self.max_model_len)
        self.eos_token_ids = _eos_ids(config.model, self.model_config, self.tokenizer)
        self.served_model_name = config.served_model_name or _default_name(config.model)
        torch.manual_seed(config.seed)
        # --tensor-parallel-size N: N-1 worker processes hold the other shards (tp_worker.py)
        self.tp, self._workers, self.device = start_group(config, self.model_config, self.device, self.dtype,
                                                          self.max_model_len)
        try:
            self._start(config)
        except BaseException:
            self.close(clean=False)
            raise

    def _start(self, config: EngineConfig) -> None:
        """Model, both cache tiers, scheduler, warm-up (every rank in step: tp_worker.py)."""
        self.runner = ModelRunner(config, self.model_config, self.device, self.dtype, self.max_model_len, self.tp)
        num_blocks = agree_gpu_blocks(self.runner, config, self.max_model_len)
        self.runner.allocate_cache(num_blocks)
        self.cost_model = self._cost_model(num_blocks)
        num_cpu_blocks = self._num_cpu_blocks(num_blocks)
        if self.tp.enabled:
            num_cpu_blocks = self.tp.share_int(num_cpu_blocks, self.device)
        self.runner.allocate_cpu_cache(num_cpu_blocks)
        cache = CacheManager(num_blocks, config.block_size, config.cache_mode, config.eviction,
                             num_cpu_blocks=num_cpu_blocks, cost_model=self.cost_model)
        self.scheduler = Scheduler(cache, config.max_num_batched_tokens, config.max_num_seqs)  # owns the cache
        self.runner.warm_up(config.max_num_batched_tokens)
        pin = self.device.type == "cuda"
        self.sampler = Sampler(staging=(PinnedPair(4 * config.max_num_seqs, torch.int64, pin=pin),
                                        PinnedPair(2 * config.max_num_seqs, torch.float32, pin=pin)))
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            self.sampler.warm_up(self.model_config["vocab_size"], config.max_num_seqs, self.device)
            log.info("warm-up: sampling at every row count in %.1f s", time.perf_counter() - t0)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.last_step: StepInfo | None = None
        self.inflight: InFlight | None = None
        self._seeds = random.Random(config.seed)  # sampler seeds of requests that give none
        # sampled ids come back through pinned memory (a step samples at most one token per request)
        self._token_host = PinnedPair(config.max_num_seqs, torch.int64, pin=self.device.type == "cuda")
        self.async_scheduling = config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and self.device.type == "cuda")
        self._ids = itertools.count()
        log.info("engine ready: %s on %s (%s), %d GPU-tier + %d CPU-tier blocks of %d tokens (%.2f MiB each), "
                 "max_model_len %d, cache mode %s, eviction %s (cost: %s)",
                 self.model_config["architecture"], self.device, str(self.dtype).replace("torch.", ""),
                 num_blocks, num_cpu_blocks, config.block_size, self.runner.pod_bytes_per_block / 2**20,
                 self.max_model_len, config.cache_mode, config.eviction, self.cost_model.source)

    # ---------------------------------------------------------------- API
    @property
    def cache(self) -> CacheManager:
        """The scheduler's cache manager, for inspection only (tests, benchmarks, the metrics
        snapshot): the engine changes it through the scheduler."""
        return self.scheduler.cache

    @property
    def num_gpu_blocks(self) -> int:
        return self.scheduler.num_gpu_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.scheduler.num_cpu_blocks

    def swap_bytes(self, direction: str) -> int:
        """Bytes copied between the tiers, summed over the tensor-parallel ranks."""
        stats = self.cache.stats
        blocks = {"in": stats.swap_in_blocks, "out": stats.swap_out_blocks,
                  "out_in_step": stats.swap_out_in_step_blocks}[direction]
        return blocks * self.runner.pod_bytes_per_block

    def close(self, clean: bool = True) -> None:
        """Stop the tensor-parallel workers and leave the group (idempotent; nothing at size 1).
        ``clean``: the workers are told to stop between steps; else they are terminated."""
        workers, self._workers = getattr(self, "_workers", None), None
        if workers is None:
            return
        workers.stop(self.runner if clean else None)
        self.runner.release_graphs()  # (stop did it on a clean stop; the group cannot go before them)
        from .parallel import destroy_group
        destroy_group()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Render messages with the checkpoint's chat template and tokenize (InvalidRequestError if
        the template or the tokenizer refuses them, ContextLengthExceededError if they cannot fit)."""
        return self.prompts.encode_chat(messages)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, session_id: str | None = None,
                    owner: str | None = None, history: list[int] | None = None, stored_context: int = 0) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError (and
        subclasses) for bad input, leaving the engine untouched.

        The session is ``(owner, session_id)``: another owner's session of the same id is
        a different session. ``history`` is the conversation's token history as the
        caller's session store last recorded it; the prompt's prefix that matches it and
        that this engine's cache does not hold is counted (and reported) as recomputed.
        ``stored_context`` instead of ``history``: the length of that matching prefix, when the
        caller computed it (the HTTP server does, so the history never crosses to the engine)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        vocab = self.model_config["vocab_size"]
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias token ids must be below the vocabulary size {vocab}, got "
                                      f"{max(params.logit_bias)}", "logit_bias")
        token_ids = self._tokenize(prompt)
        self.prompts.check_len(len(token_ids), "messages")
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
            session = self.scheduler.open_turn(session_id, owner, request_id)
        req = Request(request_id, list(token_ids), len(token_ids), params, max_tokens, session=session)
        if history:
            req.stored_context = stored_context_len(history, req.token_ids)
        elif stored_context:
            req.stored_context = max(0, min(int(stored_context), len(req.token_ids)))
        req.seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        if params.detokenize or params.stop:
            req.text = TextStream(self.tokenizer, token_ids, params.stop)
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
        """One scheduler step: schedule -> launch -> collect. Returns the outputs collected.

        With asynchronous scheduling (CUDA by default) the step launched here is
        collected by the next call: its sampled tokens stay on the device, where
        the next step reads them, and the host schedules and prepares that next
        step while the GPU still computes this one. Without it, a step is
        collected at once (same code, no overlap)."""
        done = self.runner.copies_done()
        if done:
            self.scheduler.copies_done(done)
        t_sched = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        t0 = time.perf_counter()
        launched = None if sched.is_empty else self._launch(sched)
        if launched is not None:
            launched.info.launch_s = time.perf_counter() - t0
            launched.info.schedule_s = t0 - t_sched
        done, self.inflight = self.inflight, launched
        if not self.async_scheduling:
            done, self.inflight = launched, None
        return self._collect(done) if done is not None else []

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
        self.scheduler.delete_session(s.key)
        return out

    def expire_idle_sessions(self) -> list[SessionKey]:
        """Forget the cache of sessions idle longer than ``session_idle_timeout``; returns their keys."""
        ttl = self.config.session_idle_timeout
        if ttl <= 0:
            return []
        expired = self.scheduler.expire_idle(ttl)
        if expired:
            log.info("expired %d idle session(s)", len(expired))
        return expired

    def offload_session(self, session_id: str | SessionKey, owner: str | None = None) -> int:
        """Copy an idle session's context to the CPU tier and free its GPU blocks, now."""
        moved, plan = self.scheduler.offload(session_id, owner)
        self.runner.execute(SchedulerOutput(swaps=plan))
        self.scheduler.step_done()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return moved

    def get_session(self, session_id: str | SessionKey, owner: str | None = None) -> Session:
        """The session ``(owner, session_id)`` (or a SessionKey); UnknownSessionError if this engine
        holds none. Another owner's session of the same id is simply a different, unknown one."""
        return self.scheduler.get_session(session_id, owner)

    # ---------------------------------------------------------------- internals
    def _cost_model(self, num_gpu_blocks: int) -> CostModel:
        """Measured chunk costs on CUDA (cached on disk), the analytic FLOP count elsewhere."""
        analytic = CostModel.analytic(self.model_config, self.config.block_size, self.max_model_len)
        if self.device.type != "cuda" or self.config.cache_mode != "pensieve" or self.config.eviction != "retention":
            return analytic
        if self.tp.enabled:  # timing a chunk would need the workers in step: the FLOP count ranks alike
            log.info("tensor parallel: analytic chunk cost (no measured profile)")
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
        per_block = self.runner.pod_bytes_per_block  # the pod's memory holds every rank's shard
        if config.cpu_cache_bytes_value() is not None:
            return config.cpu_cache_bytes_value() // per_block
        limit, is_cgroup = host_memory_limit()
        budget = limit if is_cgroup else usable_memory(limit)
        weights = sum(p.numel() * p.element_size() for p in self.runner.model.parameters()) * self.tp.world_size
        on_host = weights + num_gpu_blocks * per_block if self.device.type == "cpu" else 0
        overhead = engine_overhead_bytes(self.tp.world_size)  # every rank is a process
        return cpu_tier_bytes(budget, overhead, resident_bytes=on_host) // per_block

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            ids = self.prompts.encode_text(prompt)
        elif isinstance(prompt, (list, tuple)):
            self.prompts.check_len(len(prompt), "prompt")  # before the O(n) check below
            ids = list(prompt)
            vocab = self.model_config["vocab_size"]
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        return ids

    def _launch(self, sched: SchedulerOutput) -> InFlight | None:
        """Run a step and sample on the device, without waiting. Each sampling request
        gets a placeholder token (-1 - its row in this step's samples) that the next
        step's inputs resolve on the device and the collection fills in."""
        prev = self.inflight.tokens if self.inflight is not None else None
        t0 = time.perf_counter()
        logits = self.runner.execute(sched, prev_tokens=prev)
        execute_s = time.perf_counter() - t0
        self.scheduler.step_done()
        if logits is None:
            return None
        self.stats.steps += 1
        path = self.runner.last_path
        self.stats.step_paths[path] = self.stats.step_paths.get(path, 0) + 1
        self.stats.computed_tokens += sched.num_batched_tokens
        sampling = [c.request for c in sched.chunks if c.samples]
        tokens = self.sampler.sample(logits, [r.params for r in sampling], [r.seed for r in sampling],
                                     [len(r.token_ids) - r.num_prompt_tokens for r in sampling])
        for chunk in sched.chunks:
            if chunk.recompute:
                chunk.request.recompute_pos += chunk.num_tokens
            else:
                chunk.request.num_computed_tokens += chunk.num_tokens
        rows = []
        for j, req in enumerate(sampling):
            req.token_ids.append(-1 - j)
            req.num_pending += 1
            rows.append((req, len(req.token_ids) - 1))
        info = StepInfo.of(sched)
        info.execute_s = execute_s
        return InFlight(info, rows, tokens, *_to_host(tokens, self._token_host))

    def _collect(self, step: InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens; fill in the placeholders; emit outputs."""
        if step.event is not None:
            t0 = time.perf_counter()
            step.event.synchronize()
            step.info.wait_s = time.perf_counter() - t0
        self.last_step = step.info
        outputs = []
        now = time.monotonic()
        for (req, pos), token in zip(step.rows, step.host.tolist()):
            if req.status is RequestStatus.FINISHED:  # finished or aborted while this step ran
                continue
            req.token_ids[pos] = token
            req.num_pending -= 1
            if req.first_token_time is None:
                req.first_token_time = now
                self.stats.prompt_tokens += req.num_prompt_tokens
                self.stats.cached_prompt_tokens += req.num_cached_tokens
            self.stats.generation_tokens += 1
            outputs.append(self._emit(req, token, pos))
        return outputs

    def _emit(self, req: Request, token: int, pos: int) -> RequestOutput:
        params = req.params
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif req.text is not None and req.text.push(token):
            reason = "stop"  # a stop string: the text ends before it, the request at this token
        if reason is None and pos + 1 - req.num_prompt_tokens >= req.max_tokens:
            reason = "length"
        new_text = req.text.release(reason is not None) if req.text is not None else ""
        if reason is not None:
            return self._finish(req, reason, new_token_ids=[token], new_text=new_text)
        return self._output(req, [token], new_text, finished=False)

    def stop_at(self, request_id: str, num_tokens: int, session: SessionKey | None = None) -> None:
        """End a request as if it had stopped after its first ``num_tokens`` tokens (prompt plus
        output): the caller (the HTTP server, which owns text and stop strings there) found a stop
        string in its text. Tokens sampled beyond are dropped, so the session's context ends
        where the reply did. A request that already finished by itself (EOS or length, sampled
        before this arrived) has its ``session``'s context cut back instead."""
        req = self.requests.get(request_id)
        if req is not None:
            keep = max(req.num_prompt_tokens, min(num_tokens, len(req.token_ids) - req.num_pending))
            del req.token_ids[keep:]
            req.num_pending = 0  # the placeholders were beyond ``keep``; the step still running is ignored
            req.num_computed_tokens = min(req.num_computed_tokens, keep)
            self._finish(req, "stop")
            return
        if session is not None:
            self.scheduler.truncate_session(session, num_tokens)

    def _finish(self, req: Request, reason: str, new_token_ids=(), new_text: str = "") -> RequestOutput:
        if req.num_pending:  # the placeholder of a step still running: its token is not wanted
            del req.token_ids[len(req.token_ids) - req.num_pending:]
            req.num_pending = 0
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if not new_text and req.text is not None and reason != "abort":
            new_text = req.text.release(final=True)
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
        return self._output(req, list(new_token_ids), new_text, finished=True)

    def _output(self, req: Request, token_ids: list[int], text: str, finished: bool) -> RequestOutput:
        return RequestOutput(req.request_id, token_ids, text, finished, req.finish_reason, req.num_prompt_tokens,
                             req.num_cached_tokens, req.num_output_tokens,
                             req.session.session_id if req.session else None, req.context_sources)


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


def _default_name(model: str) -> str:
    """The checkpoint folder's name, or a GGUF file's name without its extension."""
    name = model.rstrip("/").split("/")[-1]
    return name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


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


def host_memory_limit() -> tuple[int, bool]:
    """(bytes, True) for the container's cgroup memory limit, (host memory, False) when unlimited."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < host:
            return int(raw), True
    return host, False
