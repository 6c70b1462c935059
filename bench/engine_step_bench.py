"""The engine core's host time per decode step (schedule + prepare + sample + post-process: everything but the
forward pass) and its host-to-device transfers per step, on the embedded model, at 1, 64 and 256 running sequences,
greedy and with penalties plus top-p (half the rows seeded).

Each forward (``executor.execute``) is timed and subtracted from its step; only steps where every sequence decodes
count. Transfers: on a CPU nothing moves, so the script counts what would: every tensor the engine (``scheduler/``)
builds from host data during a step (on CUDA each is a copy to the device), plus the one pinned copy that carries the
forward's inputs (``scheduler/step_inputs.py``). The model's own are left out: the torch MoE path (the CPU's) builds
index tensors, the Triton path that CUDA runs builds none.

    .venv/bin/python bench/engine_step_bench.py                          # this checkout
    .venv/bin/python bench/engine_step_bench.py --before /path/to/old    # both, interleaved, one table
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("DOTS_SERVE_REPO", str(Path(__file__).resolve().parents[1])))

from scheduler.config import EngineConfig  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402

PROMPT_TOKEN_LIMIT = 4089  # ordinary tokens of the embedded tokenizer


class HostTensorCounter:
    """Counts ``torch.tensor`` calls (host data made into a tensor) while active, by the file that made them."""

    engine_dir = f"{os.sep}scheduler{os.sep}"

    def __init__(self) -> None:
        self.by_file: dict[str, int] = {}
        self._real = torch.tensor

    def __enter__(self) -> "HostTensorCounter":
        def counting(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            self.by_file[caller] = self.by_file.get(caller, 0) + 1
            return self._real(*args, **kwargs)

        torch.tensor = counting
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.tensor = self._real

    def transfers(self) -> int:
        return 1 + sum(count for path, count in self.by_file.items() if self.engine_dir in path)


def measure(num_seqs: int, mixed: bool, steps: int, prompt_len: int, device: str = "cpu",
            dtype: str = "float32", model: str | None = None) -> dict:
    """Median host time and transfers per pure-decode step; ``model`` defaults to the embedded checkpoint."""
    from scheduler.core_messages import EngineCoreRequest  # noqa: PLC0415
    from scheduler.engine_core import EngineCore  # noqa: PLC0415
    from scheduler.request_check import check_request  # noqa: PLC0415

    rng = random.Random(0)
    config = EngineConfig(dtype=dtype, device=device, max_num_seqs=num_seqs, max_num_batched_tokens=16384,
                          kv_cache_memory=512 << 20, expert_metrics=False,
                          **({"model": model} if model is not None else {}))
    engine = EngineCore(config)
    info = engine.info
    for i in range(num_seqs):
        prompt = [rng.randrange(PROMPT_TOKEN_LIMIT) for _ in range(prompt_len)]
        params = (SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.2,
                                 seed=i if i % 2 else None, max_tokens=steps + 8, ignore_eos=True) if mixed else
                  SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
        resolved = check_request(prompt, params, info.vocab_size, info.max_model_len, info.sampling_defaults)
        engine.add_request(EngineCoreRequest(f"r{i}", prompt, resolved, time.monotonic()))
    forward_s: list[float] = []
    real_execute = engine.executor.execute

    def timed_execute(batch):
        start = time.perf_counter()
        logits = real_execute(batch)
        if logits.is_cuda:
            torch.cuda.synchronize()  # the device's time is the forward's, not the host's
        forward_s.append(time.perf_counter() - start)
        return logits

    engine.executor.execute = timed_execute
    host_s, transfers = [], []
    for _ in range(steps + 2):
        forward_s.clear()
        decoding = all(seq.num_computed_tokens >= prompt_len for seq in engine.scheduler.running)
        with HostTensorCounter() as counter:
            start = time.perf_counter()
            engine.step()
            total = time.perf_counter() - start
        if decoding and forward_s and len(engine.scheduler.running) == num_seqs:
            host_s.append(total - forward_s[0])
            transfers.append(counter.transfers())
    engine.shutdown()
    return {"host_ms": statistics.median(host_s) * 1000, "transfers": statistics.median(transfers),
            "steps": len(host_s)}


def compare(before: str, sizes: list[int], steps: int, prompt_len: int) -> None:
    """One child process per measurement, before and after alternating, so both see the same machine."""
    print("| running decodes | sampling | before: host ms/step | after: host ms/step | ratio | "
          "before: transfers/step | after: transfers/step |")
    print("|---|---|---|---|---|---|---|")
    for num_seqs in sizes:
        for mixed in (False, True):
            results = {}
            for label, repo in (("before", before), ("after", str(Path(__file__).resolve().parents[1]))):
                command = [sys.executable, __file__, "--num-seqs", str(num_seqs), "--steps", str(steps),
                           "--prompt-len", str(prompt_len), "--json", *(["--mixed"] if mixed else [])]
                output = subprocess.run(command, env={**os.environ, "DOTS_SERVE_REPO": repo}, check=True,
                                        capture_output=True, text=True).stdout
                results[label] = json.loads(output.strip().splitlines()[-1])
            b, a = results["before"], results["after"]
            print(f"| {num_seqs} | {'penalties + top-p' if mixed else 'greedy'} | {b['host_ms']:.2f} | "
                  f"{a['host_ms']:.2f} | {b['host_ms'] / a['host_ms']:.2f}x | {b['transfers']:g} | "
                  f"{a['transfers']:g} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed", action="store_true", help="penalties and top-p (half the rows seeded)")
    parser.add_argument("--before", help="an older checkout to measure in the same run (child processes)")
    parser.add_argument("--json", action="store_true", help="one measurement, as a JSON line (used by --before)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.before:
        compare(args.before, args.num_seqs, args.steps, args.prompt_len)
        return
    for num_seqs in args.num_seqs:
        result = measure(num_seqs, args.mixed, args.steps, args.prompt_len)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{num_seqs} decodes ({'penalties + top-p' if args.mixed else 'greedy'}): host "
                  f"{result['host_ms']:.2f} ms/step, {result['transfers']:g} transfers/step ({result['steps']} steps)")


if __name__ == "__main__":
    main()
