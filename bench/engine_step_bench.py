"""The engine's host time per step (schedule + prepare + sample + post-process: everything but the forward pass)
at 256 running decode sequences, on the embedded model.

The forward (``executor.execute``) is timed separately and subtracted from each pure-decode step of the full batch.
The same script measures an older checkout's engine (``LLMEngine``, which also detokenized inside its step) when
DOTS_SERVE_REPO points at it; on this one it also times the front end's share (``OutputProcessor.process``:
detokenization and stop strings), which now runs outside the engine.

    .venv/bin/python bench/engine_step_bench.py
    DOTS_SERVE_REPO=/path/to/old/checkout .venv/bin/python bench/engine_step_bench.py
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("DOTS_SERVE_REPO", str(Path(__file__).resolve().parents[1])))

from scheduler.config import EngineConfig  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402

PROMPT_TOKEN_LIMIT = 4089  # ordinary tokens of the embedded tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed", action="store_true", help="half the requests sample (top-p, penalties, seeds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=args.num_seqs, max_num_batched_tokens=16384,
                          kv_cache_memory=512 << 20, expert_metrics=False)
    prompts = [[rng.randrange(PROMPT_TOKEN_LIMIT) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5, seed=i, max_tokens=args.steps + 8,
                       ignore_eos=True) if args.mixed and i % 2 else
        SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
        for i in range(args.num_seqs)
    ]
    try:
        from scheduler.engine_core import EngineCore  # noqa: PLC0415
    except ImportError:
        EngineCore = None
    if EngineCore is not None:
        from scheduler.core_messages import EngineCoreRequest  # noqa: PLC0415
        from scheduler.output_processor import OutputProcessor  # noqa: PLC0415
        from scheduler.request_check import check_request  # noqa: PLC0415
        from scheduler.tokenizer import load_tokenizer  # noqa: PLC0415
        engine = EngineCore(config)
        processor = OutputProcessor(load_tokenizer(config.model))
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            info = engine.info
            resolved = check_request(prompt, p, info.vocab_size, info.max_model_len, info.sampling_defaults)
            processor.add(f"r{i}", prompt, resolved)
            engine.add_request(EngineCoreRequest(f"r{i}", prompt, resolved, time.monotonic()))
        label = "EngineCore (this checkout)"
    else:
        from scheduler.engine import LLMEngine  # noqa: PLC0415
        engine = LLMEngine(config)
        processor = None
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", prompt, p)
        label = "LLMEngine (older checkout: detokenizes in its step)"

    forward_s: list[float] = []
    real_execute = engine.executor.execute

    def timed_execute(batch):
        start = time.perf_counter()
        logits = real_execute(batch)
        forward_s.append(time.perf_counter() - start)
        return logits

    engine.executor.execute = timed_execute
    host, front = [], []
    for _ in range(args.steps + 2):
        forward_s.clear()
        start = time.perf_counter()
        outputs = engine.step()
        total = time.perf_counter() - start
        if processor is not None:
            start = time.perf_counter()
            processor.process(outputs)
            front_s = time.perf_counter() - start
        num_running = len(engine.scheduler.running)
        if forward_s and num_running == args.num_seqs and all(s.num_computed_tokens > args.prompt_len
                                                             for s in engine.scheduler.running):
            host.append(total - forward_s[0])
            if processor is not None:
                front.append(front_s)
    print(f"{label}: {args.num_seqs} running decode sequences{' (mixed sampling)' if args.mixed else ' (greedy)'}, "
          f"{len(host)} steps, {args.threads} torch thread(s)")
    print(f"engine host time per step: median {statistics.median(host) * 1000:.2f} ms, "
          f"mean {statistics.fmean(host) * 1000:.2f} ms")
    if front:
        print(f"front end (detokenize, stop strings) per step: median {statistics.median(front) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
