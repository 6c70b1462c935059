"""HTTP overhead: the same workload through the server at 16 concurrent streams and through the offline engine.

Both run the embedded model (or --model) with the same engine settings, in particular ``max_num_seqs`` equal to the
number of concurrent streams, so that both batch the same number of sequences. The workload: seeded random text
prompts, greedy, --max-tokens output tokens each with EOS ignored. Offline: ``scheduler.llm.LLM.generate`` over all
prompts. Server: ``python -m server`` in a subprocess, driven over HTTP by bench/serve_bench.py (streaming
completions, concurrency 16). Rounds alternate offline and server so that background load on the machine hits both;
the best round of each is compared. Target: the server reaches at least 90% of the offline output tokens/s.

    .venv/bin/python bench/http_overhead_bench.py
    .venv/bin/python bench/http_overhead_bench.py --num-requests 128 --max-tokens 256 --rounds 3
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
from serve_bench import format_summary, make_prompts, run_benchmark  # noqa: E402

TARGET_RATIO = 0.9


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    return {"dtype": args.dtype, "device": args.device, "max_num_seqs": args.concurrency,
            "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_memory": args.kv_cache_memory,
            "expert_metrics": False}


def server_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--max-num-seqs",
            str(args.concurrency), "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-cache-memory",
            str(args.kv_cache_memory), "--no-expert-metrics", "--log-level", "warning"]


def run_offline(llm: LLM, prompts: list[str], max_tokens: int) -> float:
    """Output tokens/s of one pass over the prompts."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(choice.token_ids) for result in results for choice in result.outputs) / elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(args: argparse.Namespace) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *server_flags(args)], cwd=REPO,
                               env=env)
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
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_server_round(url: str, model: str, prompts: list[str], args: argparse.Namespace) -> float:
    summary, results = asyncio.run(run_benchmark(url, "completions", model, prompts, args.max_tokens,
                                                 concurrency=args.concurrency, request_rate=float("inf")))
    failures = [r.error for r in results if not r.ok]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    print(format_summary(summary), flush=True)
    return summary.output_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-prompt-words", type=int, default=32)
    parser.add_argument("--max-prompt-words", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", type=int, default=256 * 1024**2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both (on a 2-core machine shared with the load generator, "
                             "more threads only contend)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.num_requests, args.min_prompt_words, args.max_prompt_words, seed=0)
    warmup = prompts[: args.concurrency]

    offline, served = [], []
    for round_index in range(args.rounds):
        llm = LLM(model=args.model, **engine_options(args))
        run_offline(llm, warmup, 8)
        offline.append(run_offline(llm, prompts, args.max_tokens))
        print(f"round {round_index + 1}: offline engine {offline[-1]:.1f} output tokens/s", flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        with running_server(args) as url:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_benchmark(url, "completions", model, warmup, 8, concurrency=args.concurrency,
                                      request_rate=float("inf")))
            served.append(run_server_round(url, model, prompts, args))
        print(f"round {round_index + 1}: server {served[-1]:.1f} output tokens/s", flush=True)

    best_offline, best_served = max(offline), max(served)
    ratio = best_served / best_offline
    print(f"\n{args.num_requests} requests, {args.concurrency} concurrent, {args.max_tokens} output tokens each, "
          f"{args.dtype} on {args.device}, {args.threads} torch thread(s)")
    print(f"{'output tokens/s':28}{'best':>10}{'mean':>10}   all rounds")
    for name, values in (("offline engine (LLM)", offline), (f"server, {args.concurrency} HTTP streams", served)):
        print(f"{name:28}{max(values):10.1f}{statistics.fmean(values):10.1f}   {', '.join(f'{v:.1f}' for v in values)}")
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    mean_ratio = statistics.fmean(served) / statistics.fmean(offline)
    print(f"server / offline, best rounds: {ratio:.1%} (target >= {TARGET_RATIO:.0%}): {verdict}; "
          f"mean rounds: {mean_ratio:.1%}")


if __name__ == "__main__":
    main()
