"""Two replicas of the embedded model behind vllm-router: round_robin against cache_aware, same run.

Workload: several multi-turn chats, each with a long system prompt shared by all its turns; the conversations run
concurrently, turns one after another. Per policy: the replicas' prefix-cache hit rate (their own counters) and the
time to first token the client sees. While the workload runs, /metrics of one replica is scraped as the llm-d
endpoint picker does (every 50 ms) and each scrape timed.

    python bench/router_bench.py --conversations 6 --turns 4
"""
import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from api_server import ServerProcess  # noqa: E402
from router_process import VLLM_ROUTER, RouterProcess  # noqa: E402

SCRIPTURE = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
             "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ")


def prefix_counters(replica: ServerProcess) -> tuple[float, float]:
    text = httpx.get(f"{replica.url}/metrics", timeout=30).text
    values = {sample.name: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples}
    return values["dots_serve_prefix_cache_hits_total"], values["dots_serve_prefix_cache_queries_total"]


async def conversation(client: httpx.AsyncClient, name: str, turns: int, ttfts: list[float]) -> None:
    """``name`` starts the system prompt, so that no policy finds the previous policy's prefixes cached."""
    messages = [{"role": "system", "content": f"Scribe {name}. " + SCRIPTURE * 6}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell of the day number {turn}."})
        start = time.perf_counter()
        first = None
        body = {"model": "dots1-tiny", "messages": messages, "max_tokens": 16, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {") and '"content":"' in line \
                        and '"content":""' not in line:
                    first = time.perf_counter() - start
        ttfts.append(first if first is not None else time.perf_counter() - start)
        messages.append({"role": "assistant", "content": f"Reply {turn}."})


def scrape_every_50ms(replica: ServerProcess, stop: threading.Event, durations: list[float]) -> None:
    with httpx.Client(base_url=replica.url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/metrics").raise_for_status()
            durations.append(time.perf_counter() - start)
            time.sleep(0.05)


def run_policy(replicas: list[ServerProcess], policy: str, conversations: int, turns: int) -> dict:
    before = [prefix_counters(replica) for replica in replicas]
    ttfts: list[float] = []
    scrapes: list[float] = []
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_50ms, args=(replicas[0], stop, scrapes), daemon=True)
    with RouterProcess(VLLM_ROUTER, [replica.url for replica in replicas], policy) as router:
        async def workload() -> None:
            async with httpx.AsyncClient(base_url=router.url, timeout=300) as client:
                chats = [conversation(client, f"{policy}-{index}", turns, ttfts) for index in range(conversations)]
                await asyncio.gather(*chats)

        scraper.start()
        started = time.perf_counter()
        asyncio.run(workload())
        elapsed = time.perf_counter() - started
        stop.set()
        scraper.join()
    after = [prefix_counters(replica) for replica in replicas]
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    scrapes.sort()
    return {
        "policy": policy, "requests": len(ttfts), "seconds": elapsed, "hit_rate": hits / queries,
        "ttft_mean": statistics.mean(ttfts), "ttft_p50": statistics.median(ttfts),
        "ttft_p90": sorted(ttfts)[int(0.9 * (len(ttfts) - 1))],
        "scrapes": len(scrapes), "scrape_p50_ms": 1000 * statistics.median(scrapes),
        "scrape_p99_ms": 1000 * scrapes[int(0.99 * (len(scrapes) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    with ServerProcess() as first, ServerProcess() as second:
        results = [run_policy([first, second], policy, args.conversations, args.turns)
                   for policy in ("round_robin", "cache_aware")]
    print("| policy | requests | prefix-cache hit rate | TTFT mean | TTFT p50 | TTFT p90 | wall | /metrics scrapes "
          "| scrape p50 | scrape p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['policy']} | {r['requests']} | {r['hit_rate']:.1%} | {r['ttft_mean'] * 1000:.0f} ms | "
              f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p90'] * 1000:.0f} ms | {r['seconds']:.1f} s | "
              f"{r['scrapes']} | "
              f"{r['scrape_p50_ms']:.1f} ms | {r['scrape_p99_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
