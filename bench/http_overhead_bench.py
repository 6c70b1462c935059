"""HTTP overhead: the same workload through the server at N concurrent streams and through the offline engine.

Both run the embedded model (or --model) with the same engine settings, in particular ``max_num_seqs`` equal to the
number of concurrent streams, so that both batch the same number of sequences. The workload: seeded random text
prompts, greedy, --max-tokens output tokens each with EOS ignored. Offline: ``scheduler.llm.LLM.generate`` over all
prompts (the engine core in this process). Server: ``python -m server`` in a subprocess (its engine core in a process
of its own), driven over HTTP by bench/serve_bench.py (streaming completions). Rounds alternate offline and server
so that background load on the machine hits both; best and mean rounds are compared.

CPU time per generated token: offline, this process's CPU time during generate; server, the CPU time of the server
process and every process under it (the engine process) during the round, read from /proc; the load client (this
process) is excluded. With --single-stream, one stream's time per output token (TPOT) through the server is compared
with the offline engine's decode step time for one sequence.

    .venv/bin/python bench/http_overhead_bench.py
    .venv/bin/python bench/http_overhead_bench.py --concurrency 16 48 128 --rounds 3 --single-stream
    .venv/bin/python bench/http_overhead_bench.py --server-flags=--no-engine-process   # the engine on a thread
"""
import argparse
import asyncio
import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from model.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from scheduler.llm import LLM  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from scheduler.stats import StepStats  # noqa: E402
from serve_bench import format_summary, make_prompts, run_benchmark  # noqa: E402

TARGET_RATIO = 0.88
TARGET_CPU_RATIO = 1.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def engine_options(args: argparse.Namespace, concurrency: int) -> dict[str, object]:
    return {"dtype": args.dtype, "device": args.device, "max_num_seqs": concurrency,
            "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_memory": args.kv_cache_memory,
            "expert_metrics": False}


def server_flags(args: argparse.Namespace, concurrency: int) -> list[str]:
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--max-num-seqs",
            str(concurrency), "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-cache-memory",
            str(args.kv_cache_memory), "--no-expert-metrics", "--log-level", "warning",
            "--max-concurrent-requests", str(max(256, concurrency)), *args.server_flags.split()]


class DecodeSteps:
    """Durations of the offline engine's pure-decode steps."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_step(self, step: StepStats) -> None:
        if step.num_prefill_tokens == 0:
            self.durations.append(step.duration_s)

    def on_request_finished(self, request: object) -> None:
        pass

    def on_expert_counts(self, layer_ids: list[int], counts: object) -> None:
        pass


def run_offline(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    """Output tokens/s of one pass over the prompts, and CPU seconds per output token."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(choice.token_ids) for result in results for choice in result.outputs)
    return tokens / elapsed, cpu / tokens


def process_tree_cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of ``pid``, and of every live process under it."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    below, frontier = 0.0, [child for child, (parent, _) in stats.items() if parent == pid]
    while frontier:
        current = frontier.pop()
        below += stats.get(current, (0, 0.0))[1]
        frontier += [child for child, (parent, _) in stats.items() if parent == current]
    return stats.get(pid, (0, 0.0))[1], below


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(args: argparse.Namespace, concurrency: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    # A session of its own: where the kernel shares CPU between sessions (autogroups) on a busy machine, the
    # server's processes then get the share the offline engine got, and the load client (this process) its own.
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *server_flags(args, concurrency)],
                               cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_server_round(url: str, pid: int, model: str, prompts: list[str], concurrency: int,
                     args: argparse.Namespace) -> tuple[float, float, float]:
    """Output tokens/s, server CPU seconds per output token, mean TPOT in seconds."""
    front_start, engine_start = process_tree_cpu_s(pid)
    summary, results = asyncio.run(run_benchmark(url, "completions", model, prompts, args.max_tokens,
                                                 concurrency=concurrency, request_rate=float("inf")))
    front_end, engine = process_tree_cpu_s(pid)
    front_end, engine = front_end - front_start, engine - engine_start
    failures = [r.error for r in results if not r.ok]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    print(format_summary(summary), flush=True)
    tokens = sum(r.output_tokens for r in results)
    print(f"CPU ms per output token: front end {front_end / tokens * 1000:.3f}, engine process "
          f"{engine / tokens * 1000:.3f}", flush=True)
    return summary.output_tokens_per_s, (front_end + engine) / tokens, summary.tpot_ms["mean"] / 1000


def compare(args: argparse.Namespace, concurrency: int) -> None:
    num_requests = args.num_requests or 2 * concurrency
    prompts = make_prompts(num_requests, args.min_prompt_words, args.max_prompt_words, seed=0)
    warmup = prompts[:concurrency]
    offline, served = [], []
    for round_index in range(args.rounds):
        llm = LLM(model=args.model, **engine_options(args, concurrency))
        run_offline(llm, warmup, 8)
        offline.append(run_offline(llm, prompts, args.max_tokens))
        print(f"round {round_index + 1}: offline engine {offline[-1][0]:.1f} output tokens/s, "
              f"{offline[-1][1] * 1000:.2f} CPU ms/token", flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        with running_server(args, concurrency) as (url, pid):
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_benchmark(url, "completions", model, warmup, 8, concurrency=concurrency,
                                      request_rate=float("inf")))
            served.append(run_server_round(url, pid, model, prompts, concurrency, args))
        print(f"round {round_index + 1}: server {served[-1][0]:.1f} output tokens/s, "
              f"{served[-1][1] * 1000:.2f} CPU ms/token", flush=True)
    print(f"\n{num_requests} requests, {concurrency} concurrent, {args.max_tokens} output tokens each, "
          f"{args.dtype} on {args.device}, {args.threads} torch thread(s), server flags: {args.server_flags or '-'}")
    print(f"{'':28}{'tok/s best':>12}{'tok/s mean':>12}{'CPU ms/tok best':>17}{'mean':>8}")
    for name, values in (("offline engine (LLM)", offline), (f"server, {concurrency} HTTP streams", served)):
        rates, cpus = [v[0] for v in values], [v[1] * 1000 for v in values]
        print(f"{name:28}{max(rates):12.1f}{statistics.fmean(rates):12.1f}{min(cpus):17.2f}"
              f"{statistics.fmean(cpus):8.2f}")
    ratio = max(v[0] for v in served) / max(v[0] for v in offline)
    mean_ratio = statistics.fmean(v[0] for v in served) / statistics.fmean(v[0] for v in offline)
    cpu_ratio = min(v[1] for v in served) / min(v[1] for v in offline)
    mean_cpu_ratio = statistics.fmean(v[1] for v in served) / statistics.fmean(v[1] for v in offline)
    print(f"throughput server / offline: best {ratio:.1%}, mean {mean_ratio:.1%} (target >= {TARGET_RATIO:.0%}); "
          f"CPU per token server / offline: best {cpu_ratio:.2f}x, mean {mean_cpu_ratio:.2f}x "
          f"(target <= {TARGET_CPU_RATIO:.2f}x)\n", flush=True)


def single_stream(args: argparse.Namespace) -> None:
    """One stream: the server's time per output token against the offline engine's decode step for one sequence."""
    prompts = make_prompts(4, args.min_prompt_words, args.max_prompt_words, seed=1)
    steps = DecodeSteps()
    llm = LLM(model=args.model, stats_listener=steps, **engine_options(args, 1))
    run_offline(llm, prompts[:1], 8)
    steps.durations.clear()
    run_offline(llm, prompts, args.max_tokens)
    llm.shutdown()
    step_s = statistics.median(steps.durations)
    with running_server(args, 1) as (url, pid):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        asyncio.run(run_benchmark(url, "completions", model, prompts[:1], 8, concurrency=1, request_rate=float("inf")))
        _, _, tpot_s = run_server_round(url, pid, model, prompts, 1, args)
    print(f"one stream: server TPOT {tpot_s * 1000:.2f} ms, offline decode step (median) {step_s * 1000:.2f} ms: "
          f"{tpot_s / step_s:.2f}x (target <= 1.10x)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--num-requests", type=int, help="per round (default: twice the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-prompt-words", type=int, default=32)
    parser.add_argument("--max-prompt-words", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", type=int, default=256 * 1024**2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single-stream", action="store_true", help="also compare one stream's TPOT with a decode step")
    parser.add_argument("--server-flags", default="", help="extra server flags, e.g. --no-engine-process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both (on a 2-core machine shared with the load generator, "
                             "more threads only contend)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for concurrency in args.concurrency:
        compare(args, concurrency)
    if args.single_stream:
        single_stream(args)


if __name__ == "__main__":
    main()
