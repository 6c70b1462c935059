"""Model-level speed: our Dots1 against Transformers' Dots1ForCausalLM on the same random weights, in the same run.

Decode: B sequences are prefilled, then run greedy one-token steps through each engine's own KV cache (ours paged,
with interleaved block tables; Transformers' DynamicCache, called generate-style with logits_to_keep=1). Prefill:
B sequences of P prompt tokens in one forward. Both engines run under torch.inference_mode, alternating round by
round so machine noise hits both alike; each figure is the median over rounds and steps.

Also reported: the weight bytes one batch-1 decode step reads (every weight but the embedding table and the routed
experts it did not pick) over our step time, next to this machine's measured memory bandwidth: the limit a batch-1
decode can approach.

    .venv/bin/python bench/model_bench.py             # full run, several minutes
    .venv/bin/python bench/model_bench.py --quick     # fewer rounds, steps and tokens
"""
import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dots1 import Dots1ForCausalLM  # noqa: E402
from model.forward_batch import ForwardBatch  # noqa: E402
from model.kv_cache import allocate_kv_cache  # noqa: E402
from model.loader import load_model  # noqa: E402
from mid_size import MID_SIZE, write_mid_size_checkpoint  # noqa: E402

BLOCK_SIZE = 16
FULL = dict(rounds=3, decode_context=128, decode_steps=16, prefill_tokens=256)
QUICK = dict(rounds=2, decode_context=64, decode_steps=8, prefill_tokens=64)


class OurEngine:
    def __init__(self, model: Dots1ForCausalLM, max_tokens_per_seq: int, max_seqs: int):
        self.model = model
        blocks_per_seq = -(-max_tokens_per_seq // BLOCK_SIZE)
        dtype = model.embed_tokens.weight.dtype
        self.kv_caches = allocate_kv_cache(model.config, blocks_per_seq * max_seqs, BLOCK_SIZE, dtype, "cpu")
        # Interleaved block tables, as a busy block manager hands them out.
        self.tables = [[block * max_seqs + seq for block in range(blocks_per_seq)] for seq in range(max_seqs)]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        batch = ForwardBatch.build(prompts, [0] * len(prompts), self.tables[:len(prompts)], BLOCK_SIZE)
        return self.model(batch, self.kv_caches)

    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        """Seconds of each decode step after prefilling ``prompts``."""
        tokens = self.prefill(prompts).argmax(dim=-1).tolist()
        cached, times = len(prompts[0]), []
        for _ in range(steps):
            start = time.perf_counter()
            batch = ForwardBatch.build([[t] for t in tokens], [cached] * len(tokens), self.tables[:len(tokens)],
                                       BLOCK_SIZE)
            tokens = self.model(batch, self.kv_caches).argmax(dim=-1).tolist()
            times.append(time.perf_counter() - start)
            cached += 1
        return times


class ReferenceEngine:
    def __init__(self, model_dir: Path, dtype: torch.dtype):
        from transformers import Dots1ForCausalLM as ReferenceModel

        self.model = ReferenceModel.from_pretrained(model_dir, dtype=dtype).eval()

    def prefill(self, prompts: list[list[int]]):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor(prompts), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), cache

    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        logits, cache = self.prefill(prompts)
        tokens, times = logits.argmax(dim=-1, keepdim=True), []
        for _ in range(steps):
            start = time.perf_counter()
            out = self.model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].float().argmax(dim=-1, keepdim=True)
            times.append(time.perf_counter() - start)
        return times


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_bandwidth() -> tuple[float, float]:
    """(read, copy read+write) bytes per second over a 512 MiB tensor, best of five."""
    source = torch.ones(128 * 2**20, dtype=torch.float32)
    destination = torch.empty_like(source)
    size = source.numel() * source.element_size()
    read = min(seconds(source.sum) for _ in range(5))
    copy = min(seconds(lambda: destination.copy_(source)) for _ in range(5))
    return size / read, 2 * size / copy


def decode_weight_bytes(model: Dots1ForCausalLM, engine: OurEngine, prompt: list[int], steps: int) -> float:
    """Weight bytes one batch-1 decode step reads: all weights but the embedding table and the unpicked experts."""
    tokens = engine.prefill([prompt]).argmax(dim=-1).tolist()
    model.take_expert_counts()
    experts_used = 0
    for step in range(steps):
        batch = ForwardBatch.build([tokens], [len(prompt) + step], engine.tables[:1], BLOCK_SIZE)
        tokens = model(batch, engine.kv_caches).argmax(dim=-1).tolist()
        experts_used += int((model.take_expert_counts()[1] > 0).sum())
    routed = model.layers[model.moe_layer_ids[0]].mlp.experts
    bytes_per_expert = sum(w.numel() * w.element_size() for w in (routed.w13[0], routed.w2[0]))
    other = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if not name.startswith("embed_tokens") and ".experts.w" not in name)
    return other + bytes_per_expert * experts_used / steps


def row(phase: str, dtype: torch.dtype, batch: int, tokens: int, ours: float, theirs: float) -> str:
    name = str(dtype).removeprefix("torch.")
    return f"| {phase} | {name} | {batch} | {tokens} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |"


def run(options: dict, model_dir: Path, batches: list[int], dtypes: list[torch.dtype]) -> list[str]:
    """Prints the table rows as they come; returns the batch-1 weight-bandwidth lines."""
    bandwidth_lines = []
    generator = torch.Generator().manual_seed(0)
    vocab, rounds, steps = MID_SIZE["vocab_size"], options["rounds"], options["decode_steps"]
    for dtype in dtypes:
        ours = load_model(model_dir, dtype=dtype, device="cpu", expert_metrics=True)
        reference = ReferenceEngine(model_dir, dtype)
        for batch in batches:
            context, prefill_tokens = options["decode_context"], options["prefill_tokens"]
            engine = OurEngine(ours, max(context + steps + 1, prefill_tokens), batch)
            prompts = torch.randint(0, vocab, (batch, context), generator=generator).tolist()
            engine.decode(prompts, 1)  # warm-up: first-call allocations and kernel selection
            reference.decode(prompts, 1)
            our_steps, their_steps = [], []
            for _ in range(rounds):
                our_steps += engine.decode(prompts, steps)
                their_steps += reference.decode(prompts, steps)
            print(row("decode", dtype, batch, context, batch / statistics.median(our_steps),
                      batch / statistics.median(their_steps)), flush=True)
            prompts = torch.randint(0, vocab, (batch, prefill_tokens), generator=generator).tolist()
            our_times, their_times = [], []
            for _ in range(rounds):
                our_times.append(seconds(lambda: engine.prefill(prompts)))
                their_times.append(seconds(lambda: reference.prefill(prompts)))
            print(row("prefill", dtype, batch, prefill_tokens, batch * prefill_tokens / statistics.median(our_times),
                      batch * prefill_tokens / statistics.median(their_times)), flush=True)
        engine = OurEngine(ours, options["decode_context"] + steps + 1, 1)
        prompt = torch.randint(0, vocab, (options["decode_context"],), generator=generator).tolist()
        step_bytes = decode_weight_bytes(ours, engine, prompt, steps)
        step_time = statistics.median(engine.decode([prompt], steps))
        bandwidth_lines.append(f"{str(dtype).removeprefix('torch.')} batch-1 decode: {step_bytes / 2**20:.0f} MiB "
                               f"of weights per step / {step_time * 1e3:.1f} ms = "
                               f"{step_bytes / step_time / 1e9:.1f} GB/s")
        del ours, reference, engine
        gc.collect()
    return bandwidth_lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Dots1 model speed against Transformers (CPU).")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, decode steps and prompt tokens")
    parser.add_argument("--checkpoint", type=Path, help="directory to write the random checkpoint to or reuse it from")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():
        model_dir = args.checkpoint or Path(scratch)
        if not (model_dir / "config.json").is_file():
            print(f"writing the mid-size random checkpoint to {model_dir}", flush=True)
            write_mid_size_checkpoint(model_dir)
        read, copy = memory_bandwidth()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options['rounds']} rounds")
        print("| phase | dtype | batch | context / prompt tokens | ours tok/s | Transformers tok/s "
              "| ours / Transformers |")
        print("|---|---|---|---|---|---|---|", flush=True)
        lines = run(options, model_dir, args.batches, [getattr(torch, name) for name in args.dtypes])
        print(f"\nmemory bandwidth: read {read / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s (read + write)")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
