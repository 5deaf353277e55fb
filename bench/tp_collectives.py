"""What a tensor-parallel step's collectives cost on this machine, apart from the engine.

    python bench/tp_collectives.py --size 2 --out collectives.json

Spawns ``--size`` processes (one per GPU, NCCL for the device collectives, a gloo
group for the host messages, as ``pensieve.engine.parallel`` sets them up) and
times, each as the median of ``--iters`` runs after warm-up:

* the NCCL all-reduce of one layer's output at a decode step (64 rows) and at a
  4096-token prefill step (bf16, hidden 4096): a step makes two per layer;
* the all-gather of the LM head's vocabulary shards for 64 rows;
* the gloo broadcast of a step's header (13 int32) and of a 64-request payload.

With ``NCCL_DEBUG=INFO`` NCCL prints the transport it chose (P2P over NVLink, or
shared memory through the host).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

HIDDEN, VOCAB = 4096, 128256


def _time(fn, iters: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _worker(rank: int, size: int, port: int, iters: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    store = torch.distributed.TCPStore("127.0.0.1", port, size, is_master=rank == 0, wait_for_workers=False)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=size, device_id=dev)
    host = dist.new_group(backend="gloo")
    sync = torch.cuda.synchronize
    out = {}
    for rows in (64, 4096):
        t = torch.randn(rows, HIDDEN, dtype=torch.bfloat16, device=dev)
        out[f"all_reduce {rows}x{HIDDEN} bf16 (us)"] = _time(lambda: dist.all_reduce(t), iters, sync)
    shard = torch.randn(64, VOCAB // size, dtype=torch.bfloat16, device=dev)
    parts = [torch.empty_like(shard) for _ in range(size)]
    out[f"all_gather 64x{VOCAB // size} bf16 (us)"] = _time(lambda: dist.all_gather(parts, shard), iters, sync)
    header = torch.zeros(13, dtype=torch.int32)
    payload = torch.zeros(64 * 40, dtype=torch.int32)
    out["gloo broadcast header (us)"] = _time(lambda: dist.broadcast(header, 0, group=host), iters, lambda: None)
    out["gloo broadcast 10 KB payload (us)"] = _time(lambda: dist.broadcast(payload, 0, group=host), iters,
                                                     lambda: None)
    # 64 all-reduces in a row, as one decode step's layers issue them (no host sync between)
    t = torch.randn(64, HIDDEN, dtype=torch.bfloat16, device=dev)

    def layers():
        for _ in range(64):
            dist.all_reduce(t)
    out["64 all_reduce 64x4096 back to back (us)"] = _time(layers, max(iters // 10, 5), sync)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = harness.parser(__doc__, shape=False, workdir=False)
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    import socket

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < args.size:
        print(f"needs {args.size} CUDA devices, found {torch.cuda.device_count()}")
        return 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.size, port, args.iters, queue)) for r in range(args.size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(60)
    harness.write_result(dict(size=args.size, iters=args.iters, timings=result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
