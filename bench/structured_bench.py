"""Grammar-constrained decoding cost: 16 concurrent json_schema requests against 16 unconstrained ones on the same
prompts, and the time to compile a schema (cold and cached).

Both runs go through the offline engine (``LLM.generate``, all requests at once) with the same prompts, seeds and
``max_tokens``. The schema is an unbounded array of nested objects (enums, numbers, strings with maxLength), so every
constrained request runs to ``max_tokens`` like the unconstrained ones (EOS ignored) and both runs do the same number
of steps at the same batch size: the throughput ratio is the cost of the masks (filled on the CPU while the forward
runs, applied before sampling). Compile time: a fresh compiler per schema (cold: compile plus the first mask, which
llguidance builds lazily) against a cache hit.

dots.llm1 is a mixture of experts: what the tokens are changes which experts run, so JSON and free text cost a
different amount per step whatever the masks cost. A third run, a regex that allows any text (``any_text``), samples
the same tokens as the unconstrained run with every mask filled and applied: its ratio is the masks' own cost.
EOS gets a logit bias of -100 in every run: that grammar accepts EOS, and an EOS it consumed would end the choice.

    .venv/bin/python bench/structured_bench.py                  # the embedded model, 16 + 16 requests, 96 tokens
    .venv/bin/python bench/structured_bench.py --mid-size       # the mid-size random checkpoint (bench/mid_size.py)
    .venv/bin/python bench/structured_bench.py --threads 1      # on a shared machine (see engine_bench.py)
"""
import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from scheduler.llm import LLM  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from scheduler.structured_output.compiler import GrammarCompiler  # noqa: E402
from scheduler.structured_output.spec import StructuredOutputSpec  # noqa: E402
from mid_size import write_mid_size_checkpoint  # noqa: E402

PROMPT_TOKEN_LIMIT = 4089  # prompt ids are ordinary tokens of the embedded tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "score": {"type": "number"},
        "label": {"type": "string", "maxLength": 8},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["id", "kind", "score", "label", "flags"],
    "additionalProperties": False,
}
UNBOUNDED = {"type": "array", "items": ITEM, "minItems": 1000}  # never complete within max_tokens
ANY_TEXT = StructuredOutputSpec("regex", "(.|\\n)*")


def compile_schemas(compiler_factory, count: int) -> tuple[list[float], list[float]]:
    """Cold (fresh compiler, compile + first mask) and cached (compile again) times of ``count`` distinct schemas."""
    cold, cached = [], []
    for index in range(count):
        schema = {**ITEM, "properties": {**ITEM["properties"], f"field_{index}": {"type": "string", "maxLength": 4}}}
        spec = StructuredOutputSpec("json_schema", json.dumps(schema))
        compiler: GrammarCompiler = compiler_factory()
        started = time.perf_counter()
        matcher = compiler.compile(spec).new_matcher()
        bitmask = torch.zeros(1, (compiler.backend.vocab_size + 31) // 32, dtype=torch.int32)
        compiler.backend.fill_masks([matcher], bitmask)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.compile(spec)
        cached.append(time.perf_counter() - started)
        compiler.shutdown()
    return cold, cached


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, float]:
    """(tokens per wall second, tokens per process CPU second: all threads, the mask worker's included)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    results = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(len(output.token_ids) for result in results for output in result.outputs)
    assert tokens == sum(p.max_tokens for p in params), "every request runs to max_tokens"
    return tokens / elapsed, tokens / cpu


def report(name: str, rates: list[tuple[float, float]]) -> tuple[float, float]:
    best = max(wall for wall, _ in rates), max(cpu for _, cpu in rates)
    rounds = ", ".join(f"{wall:.1f}" for wall, _ in rates)
    print(f"{name:14s} {best[0]:8.1f} tokens/s wall (rounds: {rounds}); {best[1]:8.1f} tokens per CPU second")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each, in ABBA order; the best is reported")
    parser.add_argument("--mid-size", action="store_true", help="the mid-size random checkpoint instead")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    try:
        model_dir = EMBEDDED_MODEL_DIR
        if args.mid_size:
            model_dir = workdir / "mid-size"
            write_mid_size_checkpoint(model_dir)
            for name in TOKENIZER_FILES:
                shutil.copy(EMBEDDED_MODEL_DIR / name, model_dir / name)
        llm = LLM(str(model_dir), dtype="float32", device=args.device, expert_metrics=False,
                  max_num_seqs=2 * args.requests)
        rng = random.Random(0)
        prompts = [[rng.randrange(PROMPT_TOKEN_LIMIT) for _ in range(rng.randint(16, 64))]
                   for _ in range(args.requests)]
        spec = StructuredOutputSpec("json_schema", json.dumps(UNBOUNDED))

        no_eos = {token_id: -100.0 for token_id in llm.client.info.eos_token_ids}

        def params(constraint: StructuredOutputSpec | None) -> list[SamplingParams]:
            return [SamplingParams(temperature=1.0, seed=seed, max_tokens=args.max_tokens, ignore_eos=True,
                                   logit_bias=no_eos, structured_output=constraint) for seed in range(args.requests)]

        run(llm, prompts[:2], params(spec)[:2])  # warm-up (and the schema compiled once)
        run(llm, prompts, params(None))  # warm-up at the full batch size (oneDNN builds its kernels per shape)
        constraints = {"unconstrained": None, "json_schema": spec, "any_text": ANY_TEXT}
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in constraints}
        for round_index in range(args.rounds):
            order = list(constraints)[:: 1 if round_index % 2 == 0 else -1]  # ABCCBA: drift cancels
            for name in order:
                rates[name].append(run(llm, prompts, params(constraints[name])))
        print(f"model: {'mid-size' if args.mid_size else 'embedded'}; {args.requests} requests x {args.max_tokens} "
              f"tokens; torch threads {torch.get_num_threads()}")
        plain = report("unconstrained:", rates["unconstrained"])
        constrained = report("json_schema:", rates["json_schema"])
        any_text = report("any_text:", rates["any_text"])
        print(f"ratio: {constrained[0] / plain[0]:.1%} wall, {constrained[1] / plain[1]:.1%} CPU (target >= 85%)")
        print(f"masks alone (any_text, same tokens): {any_text[0] / plain[0]:.1%} wall, {any_text[1] / plain[1]:.1%} CPU")

        def fresh_compiler() -> GrammarCompiler:
            return GrammarCompiler(llm.engine.structured_output.compiler.backend)

        cold, cached = compile_schemas(fresh_compiler, 10)
        print(f"schema compile, cold (compile + first mask): median {statistics.median(cold) * 1e3:.2f} ms, "
              f"max {max(cold) * 1e3:.2f} ms; cached: median {statistics.median(cached) * 1e6:.1f} us")
        llm.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
