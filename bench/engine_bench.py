"""Offline throughput: the continuous-batching engine against Transformers ``generate`` on the same weights, same run.

A random mid-size Dots1 checkpoint (fp32) is written to a temporary directory with the embedded tokenizer. The same
requests (random prompt token ids, lengths uniform in [min, max], greedy, a fixed number of output tokens with EOS
ignored) go through ``LLM.generate`` (all at once) and through Transformers' ``Dots1ForCausalLM.generate`` in
static, left-padded batches run one after the other. Time to first token counts from the moment every request was
submitted (t0), so it includes queueing in both; inter-token latency is the gap between consecutive tokens of one
request.

    .venv/bin/python bench/engine_bench.py            # 64 requests, prompts 32..512, 128 output tokens
    .venv/bin/python bench/engine_bench.py --quick    # 24 requests, prompts 32..128, 32 output tokens
    .venv/bin/python bench/engine_bench.py --threads 1  # on a shared machine: see below
    .venv/bin/python bench/engine_bench.py --device cuda --dtype bfloat16   # the same comparison on a GPU

On a CPU shared with other busy processes, torch's default of one OpenMP thread per core makes every parallel
region wait for a descheduled peer thread (small ops become 100x slower); ``--threads 1`` gives stable numbers there.
"""
import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from scheduler.llm import LLM  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from scheduler.stats import RequestStats, StepStats  # noqa: E402
from mid_size import MID_SIZE  # noqa: E402

PROMPT_TOKEN_LIMIT = 4089  # prompt ids are ordinary tokens of the embedded tokenizer
# The embedded model's tokenizer and its stop ids (a checkpoint without EOS ids is refused at load).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Settings:
    num_requests: int
    min_prompt: int
    max_prompt: int
    output_len: int
    static_batch: int
    max_num_batched_tokens: int


FULL = Settings(num_requests=64, min_prompt=32, max_prompt=512, output_len=128, static_batch=16, max_num_batched_tokens=2048)
QUICK = Settings(num_requests=24, min_prompt=32, max_prompt=128, output_len=32, static_batch=8, max_num_batched_tokens=1024)


@dataclass
class RunResult:
    elapsed_s: float
    cpu_s: float  # process CPU time (all threads): less sensitive than wall time to other load on the machine
    output_tokens: int
    ttft_s: list[float]
    itl_s: list[float]
    first_tokens: list[int]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[RequestStats] = []

    def on_step(self, step: StepStats) -> None:
        pass

    def on_request_finished(self, request: RequestStats) -> None:
        self.requests.append(request)

    def on_expert_counts(self, layer_ids: list[int], counts: torch.Tensor) -> None:
        pass


def write_checkpoint(model_dir: Path) -> None:
    from transformers import Dots1Config, Dots1ForCausalLM

    torch.manual_seed(0)
    reference = Dots1ForCausalLM(Dots1Config(**MID_SIZE))
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape))  # non-uniform routing
    reference.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (EMBEDDED_MODEL_DIR / name).is_file():
            shutil.copy(EMBEDDED_MODEL_DIR / name, model_dir / name)


def make_prompts(settings: Settings) -> list[list[int]]:
    rng = random.Random(0)
    return [
        [rng.randrange(PROMPT_TOKEN_LIMIT) for _ in range(rng.randint(settings.min_prompt, settings.max_prompt))]
        for _ in range(settings.num_requests)
    ]


def run_engine(model_dir: Path, prompts: list[list[int]], settings: Settings, device: str, dtype: str) -> RunResult:
    element_bytes = DTYPES[dtype].itemsize
    bytes_per_token = 2 * MID_SIZE["num_hidden_layers"] * MID_SIZE["num_key_value_heads"] * MID_SIZE["head_dim"] * element_bytes
    recorder = Recorder()
    llm = LLM(
        model=str(model_dir), stats_listener=recorder, dtype=dtype, device=device,
        max_num_seqs=settings.num_requests, max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory=int(1.1 * settings.num_requests * (settings.max_prompt + settings.output_len) * bytes_per_token),
    )
    params = SamplingParams(temperature=0.0, max_tokens=settings.output_len, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    recorder.requests.clear()
    start, cpu_start = time.monotonic(), time.process_time()
    results = llm.generate(prompts, params)
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
    llm.shutdown()
    ttft = [r.first_token_time - start for r in recorder.requests]
    itl = [b - a for r in recorder.requests for a, b in zip(r.token_times, r.token_times[1:])]
    return RunResult(elapsed, cpu, sum(len(r.outputs[0].token_ids) for r in results), ttft, itl,
                     [r.outputs[0].token_ids[0] for r in results])


def run_transformers(model_dir: Path, prompts: list[list[int]], settings: Settings, device: str, dtype: str) -> RunResult:
    from transformers import Dots1ForCausalLM, StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Called once per generated token of the batch: records when each one was produced."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.monotonic())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    model = Dots1ForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    pad_id = 0

    def generate(batch: list[list[int]], new_tokens: int, clock: StepClock | None = None) -> torch.Tensor:
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)  # [B, W], left padded
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([clock] if clock else []),
            )
        return out[:, width:]  # [B, new_tokens]

    generate([prompts[0][:8]], 2)  # warm-up
    ttft, itl, first_tokens, output_tokens = [], [], [], 0
    start, cpu_start = time.monotonic(), time.process_time()
    for offset in range(0, len(prompts), settings.static_batch):
        batch = prompts[offset : offset + settings.static_batch]
        clock = StepClock()
        generated = generate(batch, settings.output_len, clock)
        output_tokens += generated.numel()
        first_tokens.extend(generated[:, 0].tolist())
        ttft.extend([clock.times[0] - start] * len(batch))
        itl.extend(b - a for a, b in zip(clock.times, clock.times[1:]) for _ in batch)
    return RunResult(time.monotonic() - start, time.process_time() - cpu_start, output_tokens, ttft, itl, first_tokens)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def row(name: str, result: RunResult) -> str:
    ttft = " / ".join(f"{percentile(result.ttft_s, q):.2f}" for q in (50, 90, 99))
    itl = " / ".join(f"{1000 * percentile(result.itl_s, q):.0f}" for q in (50, 90, 99))
    throughput = result.output_tokens / result.elapsed_s
    return (f"| {name} | {result.output_tokens} | {result.elapsed_s:.1f} | {result.cpu_s:.0f} | {throughput:.1f} "
            f"| {ttft} | {itl} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter prompts and outputs")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both runs (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    prompts = make_prompts(settings)
    print(f"{settings}; {args.device} {args.dtype}; torch threads: {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_checkpoint(model_dir)
        engine = run_engine(model_dir, prompts, settings, args.device, args.dtype)
        gc.collect()
        print(f"engine done in {engine.elapsed_s:.1f} s", flush=True)
        reference = run_transformers(model_dir, prompts, settings, args.device, args.dtype)
    same_first = sum(a == b for a, b in zip(engine.first_tokens, reference.first_tokens))
    print()
    print("| run | output tokens | wall s | CPU s | output tok/s | TTFT p50 / p90 / p99 s | ITL p50 / p90 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    print(row("dots-serve engine (continuous batching)", engine))
    print(row(f"Transformers generate (static batches of {settings.static_batch})", reference))
    ratio = (engine.output_tokens / engine.elapsed_s) / (reference.output_tokens / reference.elapsed_s)
    cpu_ratio = (engine.output_tokens / engine.cpu_s) / (reference.output_tokens / reference.cpu_s)
    print(f"\nthroughput ratio engine / Transformers: {ratio:.2f}x (per CPU second: {cpu_ratio:.2f}x)")
    print(f"first generated token equal in {same_first}/{len(prompts)} requests (greedy, same weights)")


if __name__ == "__main__":
    main()
