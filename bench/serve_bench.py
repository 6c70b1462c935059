"""Load generator for any OpenAI-compatible server: streams requests at a fixed concurrency or Poisson request rate
and reports TTFT, inter-token latency (ITL), time per output token (TPOT), end-to-end latency (p50/p95/p99),
request throughput and output tokens/s.

Prompts are seeded random word sequences (lengths uniform in [--min-prompt-words, --max-prompt-words]); every
request asks for --max-tokens tokens, with ``ignore_eos`` (an extension other servers ignore) so that lengths are
fixed. Token counts come from the final usage chunk (``stream_options.include_usage``). TTFT is from sending the
request to the first chunk with text; ITL is the gap between consecutive chunks with text (a chunk carrying several
tokens counts once); TPOT is (e2e - TTFT) / (output tokens - 1).

    make serve &                                                    # or any OpenAI-compatible server
    .venv/bin/python bench/serve_bench.py --concurrency 16 --num-requests 64
    .venv/bin/python bench/serve_bench.py --request-rate 4 --num-requests 100 --endpoint chat
    .venv/bin/python bench/serve_bench.py --base-url http://gpu-box:8000 --model dots.llm1.inst --api-key $KEY
"""
import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("the a of to and in is it that for on was with as be at by this from or have an not are but what all "
         "were when we there can which one their if will each about how up out them then she many some so these "
         "would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most "
         "know server model token cache block expert router batch stream prompt answer question story").split()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # requests/s
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]


def make_prompts(count: int, min_words: int, max_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"mean": statistics.fmean(ordered) * 1000, "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(endpoint: str, chunk: dict) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if endpoint == "chat":
        return choice.get("delta", {}).get("content") or ""
    return choice.get("text") or ""


async def send(client: httpx.AsyncClient, endpoint: str, body: dict) -> RequestResult:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk_text(endpoint, chunk):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
    except httpx.HTTPError as error:
        result.error = repr(error)
        return result
    result.e2e_s = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    if not result.ok:
        result.error = "no usage chunk (does the server support stream_options.include_usage?)"
    return result


async def run_benchmark(base_url: str, endpoint: str, model: str, prompts: list[str], max_tokens: int,
                        concurrency: int, request_rate: float, ignore_eos: bool = True, api_key: str | None = None,
                        seed: int = 0) -> tuple[Summary, list[RequestResult]]:
    """``concurrency`` caps requests in flight; ``request_rate`` (requests/s, inf: all at once) spaces arrivals."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits) as client:

        async def limited(prompt: str) -> RequestResult:
            async with gate:
                return await send(client, endpoint, request_body(endpoint, model, prompt, max_tokens, ignore_eos))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration), results


def summarize(results: list[RequestResult], duration: float) -> Summary:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return Summary(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration,
        request_throughput=len(done) / duration,
        output_tokens_per_s=output / duration,
        total_tokens_per_s=(output + prompt) / duration,
        ttft_ms=percentiles([r.ttft_s for r in done]),
        itl_ms=percentiles([gap for r in done for gap in r.itl_s]),
        tpot_ms=percentiles(tpot),
        e2e_ms=percentiles([r.e2e_s for r in done]),
    )


def format_summary(summary: Summary) -> str:
    lines = [
        f"completed {summary.completed}, failed {summary.failed}, in {summary.duration_s:.2f} s",
        f"request throughput  {summary.request_throughput:10.2f} req/s",
        f"output tokens/s     {summary.output_tokens_per_s:10.1f}",
        f"total tokens/s      {summary.total_tokens_per_s:10.1f}",
        "",
        f"{'latency (ms)':14}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for name, values in (("TTFT", summary.ttft_ms), ("ITL", summary.itl_ms), ("TPOT", summary.tpot_ms),
                         ("E2E", summary.e2e_ms)):
        lines.append(f"{name:14}" + "".join(f"{values[key]:10.1f}" for key in ("mean", "p50", "p95", "p99")))
    return "\n".join(lines)


def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="default: the first model the server lists")
    parser.add_argument("--api-key")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second (default: all at once, limited by --concurrency)")
    parser.add_argument("--min-prompt-words", type=int, default=32)
    parser.add_argument("--max-prompt-words", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (lengths then vary)")
    parser.add_argument("--warmup-requests", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary as JSON to this file")
    args = parser.parse_args()
    model = args.model or first_model(args.base_url, args.api_key)
    prompts = make_prompts(args.num_requests, args.min_prompt_words, args.max_prompt_words, args.seed)
    run = dict(base_url=args.base_url, endpoint=args.endpoint, model=model, max_tokens=args.max_tokens,
               ignore_eos=args.ignore_eos, api_key=args.api_key, seed=args.seed)
    if args.warmup_requests:
        asyncio.run(run_benchmark(prompts=prompts[: args.warmup_requests], concurrency=args.warmup_requests,
                                  request_rate=float("inf"), **run))
    summary, results = asyncio.run(run_benchmark(prompts=prompts, concurrency=args.concurrency,
                                                 request_rate=args.request_rate, **run))
    print(f"{args.endpoint} on {args.base_url} ({model}): concurrency {args.concurrency}, "
          f"request rate {args.request_rate}, {args.num_requests} requests, max_tokens {args.max_tokens}")
    print(format_summary(summary))
    for failure in [r.error for r in results if not r.ok][:5]:
        print("error:", failure)
    if args.json:
        with open(args.json, "w") as output:
            json.dump(asdict(summary), output, indent=2)


if __name__ == "__main__":
    main()
