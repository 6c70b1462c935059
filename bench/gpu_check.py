"""One-shot GPU check: kernel self-checks, parity with Transformers, no host syncs in the forward, CUDA-graph
capture, decode and prefill speed (mid-size against Transformers; the real dots.llm1.inst architecture, as many
layers as fit one card, against the card's copy bandwidth; FP8 against bf16), the KV cache in FP8, and the engine
benchmark. One table, the targets next to the numbers; every section catches its own failure and says so.

Needs only torch (with Triton), transformers and safetensors, and finishes in about five minutes on one H200.

    PYTHONPATH=. python3 bench/gpu_check.py                 # on a CUDA machine
    PYTHONPATH=. python3 bench/gpu_check.py --dry-run       # tiny shapes on a CPU: every section's code runs
"""
import argparse
import gc
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    # Triton picks its driver when first imported: without a GPU, its interpreter runs the kernels' code paths.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_parity import parity  # noqa: E402
from gpu_speed import (build_executor, copy_bandwidth, decode_weight_bytes, layers_that_fit,  # noqa: E402
                       our_decode_step, prefill_seconds, supported_options, synchronize, transformers_decode_step,
                       write_sliced_config)
from mid_size import MID_SIZE, write_mid_size_checkpoint  # noqa: E402

from model.forward_batch import ForwardBatch  # noqa: E402
from scheduler.cuda_graph_runner import EagerStepGraph  # noqa: E402

REAL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "dots.llm1.inst"
TINY_MID_SIZE = dict(MID_SIZE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                     n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
TINY_REAL_OVERRIDES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16, n_routed_experts=16,
                           num_experts_per_tok=6, max_position_embeddings=1024)


class Table:
    def __init__(self) -> None:
        self.rows = ["| check | result | target |", "|---|---|---|"]
        self.measured: dict[str, float] = {}

    def add(self, check: str, result: str, target: str = "") -> None:
        self.rows.append(f"| {check} | {result} | {target} |")
        print(self.rows[-1], flush=True)

    @contextmanager
    def section(self, name: str):
        """Runs a section; its failure becomes a row, and the next section still runs."""
        start = time.perf_counter()
        try:
            yield
        except Exception as error:
            traceback.print_exc()
            self.add(name, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300])
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"  ({name}: {time.perf_counter() - start:.1f} s)", flush=True)


def backend_options(device: str) -> dict[str, object]:
    """The fast backends on CUDA, where this checkout has the options."""
    if not device.startswith("cuda"):
        return {}
    return supported_options(attention_backend="triton", moe_backend="triton")[0]


def graph_factory(device: str) -> Callable | None:
    """None on CUDA (the executor's own choice: CUDA graphs); the replaying stand-in on a CPU dry run."""
    return None if device.startswith("cuda") else EagerStepGraph


def kernel_self_checks(table: Table, device: str) -> None:
    """The start-up self-checks of the Triton attention and MoE kernels, in every dtype the card serves."""
    from model.attention_self_check import check_triton_attention
    from model.kernels.moe.self_check import check_fused_moe

    dtypes = [torch.bfloat16, torch.float16] if device.startswith("cuda") else [torch.float32]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        with table.section(f"attention kernels self-check {name}"):
            result = check_triton_attention(device, dtype, query_heads_per_kv_head=1, windows=(None, 64))
            table.add(f"attention kernels self-check {name}", result.describe())
        with table.section(f"MoE kernels self-check {name}"):
            table.add(f"MoE kernels self-check {name}", check_fused_moe(device, dtype).describe())
    if device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9):
        with table.section("FP8 kernels self-check"):
            attention = check_triton_attention(device, torch.bfloat16, kv_cache_dtype=torch.float8_e4m3fn)
            moe = check_fused_moe(device, torch.bfloat16, fp8=True)
            table.add("FP8 kernels self-check", f"KV cache: {attention.describe()}; fused MoE: {moe.describe()}")


def describe_graphs(executor) -> str:
    runner = executor.graphs
    if runner is None:
        safe = getattr(executor.model, "graph_safe", None)
        return f"not captured (model graph_safe={safe}; eager decode)"
    return (f"{len(runner.sizes)} graphs (batch {runner.sizes[0]}..{runner.max_batch}) in "
            f"{runner.capture_seconds:.1f} s, {runner.capture_bytes / 2**20:.0f} MiB")


def no_host_syncs(table: Table, executor, device: str, label: str) -> None:
    """A decode batch and a prefill batch (one from zero, one over a cached prefix) under sync debug mode."""
    if not device.startswith("cuda"):
        table.add(f"{label}: no host syncs in forward", "skipped: needs CUDA")
        return
    blocks = executor.num_kv_blocks
    decode = ForwardBatch.build([[1]] * 16, [100] * 16, [[(b * 16 + s) % blocks for b in range(8)] for s in range(16)],
                                16)
    prefill = ForwardBatch.build([list(range(300)), list(range(5, 205))], [0, 64],
                                 [list(range(20)), list(range(20, 38))], 16)
    for name, batch in (("decode batch 16", decode), ("prefill 300 + chunk 200 over 64 cached", prefill)):
        on_device = batch.to(executor.device)
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                executor.model(on_device, executor.kv_caches)
            result = "no host sync"
        except RuntimeError as error:
            result = f"HOST SYNC: {str(error).splitlines()[0][:160]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        synchronize(device)
        table.add(f"{label}: {name} under set_sync_debug_mode('error')", result, "no host sync")


def graph_parity(table: Table, executor, label: str) -> None:
    """One decode step replayed from a graph against the same step run eagerly (it rewrites the same slots)."""
    if executor.graphs is None:
        return
    for batch_size in sorted({1, min(16, executor.graphs.max_batch)}):
        blocks = executor.num_kv_blocks
        batch = ForwardBatch.build([[7 + s] for s in range(batch_size)], [40] * batch_size,
                                   [[(b * batch_size + s) % blocks for b in range(3)] for s in range(batch_size)], 16)
        replayed = executor.execute(batch).clone()
        with torch.inference_mode():
            eager = executor.model(batch.to(executor.device), executor.kv_caches)
        error = float((replayed - eager).abs().max())
        table.add(f"{label}: graph replay vs eager, batch {batch_size}", f"max abs logit difference {error:.2e}",
                  "< 1e-2 (bf16)")


def mid_size(table: Table, device: str, dry_run: bool, scratch: Path) -> None:
    config = TINY_MID_SIZE if dry_run else MID_SIZE
    model_dir = scratch / "mid-size"
    with table.section("mid-size checkpoint"):
        if dry_run:
            _write_tiny(model_dir, config)
        else:
            write_mid_size_checkpoint(model_dir)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    batches, steps, prompt_len = ((1, 4), 4, 16) if dry_run else ((1, 16, 64, 256), 32, 256)
    kv_bytes = _kv_bytes(config, max(batches) * (prompt_len + steps + 32), dtype)
    executor = None
    with table.section("mid-size executor"):
        executor = build_executor(model_dir, device, dtype, config["max_position_embeddings"], max(batches),
                                  graph_factory(device), kv_cache_memory=kv_bytes, **backend_options(device))
        table.add("mid-size decode graphs", describe_graphs(executor))
    if executor is None:
        return
    with table.section("mid-size sync check"):
        no_host_syncs(table, executor, device, "mid-size")
    with table.section("mid-size graph parity"):
        graph_parity(table, executor, "mid-size")
    reference = None
    with table.section("Transformers mid-size"):
        from transformers import Dots1ForCausalLM as Reference

        reference = Reference.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    for batch in batches:
        with table.section(f"mid-size decode batch {batch}"):
            ours = our_decode_step(executor, batch, prompt_len, steps, config["vocab_size"])
            table.measured[f"mid decode {batch}"] = ours
            result = f"ours {batch / ours:.0f} tok/s ({ours * 1e3:.2f} ms/step)"
            if reference is not None:
                theirs = transformers_decode_step(reference, batch, prompt_len, steps, config["vocab_size"], device)
                table.measured[f"mid decode {batch} ratio"] = theirs / ours
                result += f"; Transformers {batch / theirs:.0f} tok/s ({theirs * 1e3:.2f} ms); {theirs / ours:.2f}x"
            target = {1: "step <= 2 ms", 64: ">= 8x Transformers"}.get(batch, "")
            table.add(f"mid-size decode {dtype} batch {batch}", result, target)
    if executor.graphs is not None:
        with table.section("mid-size decode batch 1 eager"):
            graphs, executor.graphs = executor.graphs, None
            try:
                eager = our_decode_step(executor, 1, prompt_len, steps, config["vocab_size"])
            finally:
                executor.graphs = graphs
            table.add("mid-size decode batch 1, eager (no graphs)", f"{eager * 1e3:.2f} ms/step")
    # Its max_position_embeddings is 4096: 8k tokens are four prompts of 2k in one step.
    for prompt_len, prompts in ((256, 1), (256, 2)) if dry_run else ((2048, 1), (2048, 4)):
        tokens = prompt_len * prompts
        with table.section(f"mid-size prefill {tokens}"):
            seconds = prefill_seconds(executor, prompt_len, prompts, config["vocab_size"])
            table.add(f"mid-size prefill {tokens} tokens ({prompts} x {prompt_len})",
                      f"{tokens / seconds:.0f} tok/s ({seconds * 1e3:.1f} ms)")
    executor.shutdown()
    del executor, reference


def real_architecture(table: Table, device: str, dry_run: bool, scratch: Path, bandwidth: float) -> None:
    """The real dots.llm1.inst shapes with dummy weights, as many layers as fit; bf16, then FP8 at the same depth."""
    source = scratch / "real-source"
    write_sliced_config(REAL_CONFIG_DIR, source, 62, **(TINY_REAL_OVERRIDES if dry_run else {}))
    batches, steps, prompt_len = ((1, 4), 4, 16) if dry_run else ((1, 16, 64, 256), 16, 128)
    if dry_run:
        free, reserve = 2**20 + 2**18, 2**18  # a pretend card that holds four tiny layers
    else:
        free, reserve = torch.cuda.mem_get_info()[0], 40 * 2**30  # KV cache, graphs, prefill activations
    layers = layers_that_fit(source, 2, free, reserve)
    model_dir = scratch / "real"
    write_sliced_config(source, model_dir, layers)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    config = json.loads((model_dir / "config.json").read_text())
    kv_bytes = _kv_bytes(config, max(batches) * (prompt_len + steps + 32) + 8192 + 64, dtype)
    step_times: dict[int, float] = {}
    max_model_len = 1024 if dry_run else 8192 + 64
    for quantization in ("bf16", "fp8"):
        label = f"real arch ({layers} layers) {dtype if quantization == 'bf16' else 'fp8'}"
        options = dict(backend_options(device))
        if quantization == "fp8":
            fp8, missing = supported_options(quantization="fp8")
            if missing:
                table.add(f"{label}", "not available in this checkout (EngineConfig has no 'quantization')")
                break
            options.update(fp8)
        executor = None
        with table.section(f"{label} executor"):
            executor = build_executor(model_dir, device, dtype, max_model_len, max(batches), graph_factory(device),
                                      load_format="dummy", kv_cache_memory=kv_bytes, **options)
            table.add(f"{label}: decode graphs", describe_graphs(executor))
        if executor is None:
            continue
        if quantization == "bf16":
            with table.section(f"{label} sync check"):
                no_host_syncs(table, executor, device, label)
        for batch in (batches if quantization == "bf16" else [b for b in batches if b <= 64]):
            with table.section(f"{label} decode batch {batch}"):
                seconds = our_decode_step(executor, batch, prompt_len, steps, config["vocab_size"])
                step_bytes = decode_weight_bytes(executor, batch)
                share = step_bytes / seconds / bandwidth
                result = (f"{batch / seconds:.0f} tok/s ({seconds * 1e3:.2f} ms/step); {step_bytes / 1e9:.3f} GB of "
                          f"weights per step = {step_bytes / seconds / 1e9:.0f} GB/s, {100 * share:.0f}% of copy "
                          f"bandwidth")
                target = ">= 60% of copy bandwidth" if batch == 1 and quantization == "bf16" else ""
                if quantization == "fp8" and batch in step_times:
                    result += f"; {step_times[batch] / seconds:.2f}x bf16"
                    target = ">= 1.6x bf16" if batch == 1 else ""
                else:
                    step_times[batch] = seconds
                table.add(f"{label} decode batch {batch}", result, target)
        if quantization == "bf16":
            for tokens in (256, 512) if dry_run else (2048, 8192):
                with table.section(f"{label} prefill {tokens}"):
                    seconds = prefill_seconds(executor, tokens, 1, config["vocab_size"])
                    table.add(f"{label} prefill {tokens} tokens",
                              f"{tokens / seconds:.0f} tok/s ({seconds * 1e3:.1f} ms)")
        executor.shutdown()
        del executor
        gc.collect()
    with table.section("KV cache capacity fp8"):
        kv_capacity(table, model_dir, device, dtype, layers, max_model_len)


def kv_capacity(table: Table, model_dir: Path, device: str, dtype: str, layers: int, max_model_len: int) -> None:
    """Tokens the KV cache holds under the default memory budget, bf16 KV against FP8 KV."""
    fp8, missing = supported_options(kv_cache_dtype="fp8")
    if missing:
        table.add("KV cache tokens, kv_cache_dtype fp8", "not available in this checkout (EngineConfig has no "
                  "'kv_cache_dtype')")
        return
    budget = {} if device.startswith("cuda") else {"kv_cache_memory": 4 * 2**20}
    tokens = {}
    for name, options in (("auto", {}), ("fp8", fp8)):
        executor = build_executor(model_dir, device, dtype, max_model_len, 256, None, load_format="dummy",
                                  enforce_eager=True,
                                  **budget, **options, **backend_options(device))
        tokens[name] = executor.num_kv_blocks * executor.block_size
        plan = getattr(executor, "memory_plan", None)
        if name == "auto" and plan is not None:
            table.add(f"memory plan ({layers} layers, 256 sequences)",
                      plan.describe().removeprefix("memory plan: "))
        executor.shutdown()
        del executor
        gc.collect()
    ratio = tokens["fp8"] / tokens["auto"]
    table.add(f"KV cache tokens ({layers} layers), kv_cache_dtype fp8",
              f"{tokens['fp8']} tokens vs {tokens['auto']} with the model dtype ({ratio:.2f}x)", "about 2x")


def engine_benchmark(table: Table, device: str, dry_run: bool, scratch: Path) -> None:
    import engine_bench

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    settings = engine_bench.FULL
    model_dir = scratch / "engine"
    if dry_run:
        settings = engine_bench.Settings(num_requests=3, min_prompt=4, max_prompt=12, output_len=4, static_batch=2,
                                         max_num_batched_tokens=64)
        _write_tiny(model_dir, dict(TINY_MID_SIZE, vocab_size=json.loads(
            (engine_bench.EMBEDDED_MODEL_DIR / "config.json").read_text())["vocab_size"]))
        for name in engine_bench.TOKENIZER_FILES:
            source = engine_bench.EMBEDDED_MODEL_DIR / name
            if source.is_file():
                (model_dir / name).write_bytes(source.read_bytes())
    else:
        engine_bench.write_checkpoint(model_dir)
    prompts = engine_bench.make_prompts(settings)
    engine = engine_bench.run_engine(model_dir, prompts, settings, device, dtype)
    gc.collect()
    reference = engine_bench.run_transformers(model_dir, prompts, settings, device, dtype)
    ratio = (engine.output_tokens / engine.elapsed_s) / (reference.output_tokens / reference.elapsed_s)
    table.measured["engine ratio"] = ratio
    table.add(f"engine benchmark ({settings.num_requests} requests, {settings.output_len} tokens each)",
              f"engine {engine.output_tokens / engine.elapsed_s:.0f} tok/s, Transformers generate "
              f"{reference.output_tokens / reference.elapsed_s:.0f} tok/s: {ratio:.2f}x", ">= 5x Transformers")


def engine_host_time(table: Table, device: str, dry_run: bool) -> None:
    """The engine core's own time per decode step (everything but the forward) on the embedded model, and the
    host-to-device transfers of a step (bench/engine_step_bench.py)."""
    import engine_step_bench

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    sizes, steps = ((1, 8), 4) if dry_run else ((1, 64, 256), 30)
    for num_seqs in sizes:
        for mixed in (False, True):
            result = engine_step_bench.measure(num_seqs, mixed, steps, 32, device, dtype)
            table.add(f"engine host time, {num_seqs} decodes, {'penalties + top-p' if mixed else 'greedy'}",
                      f"{result['host_ms']:.2f} ms/step, {result['transfers']:g} host-to-device transfers/step",
                      "1 transfer/step (greedy)" if not mixed else "")


def _write_tiny(model_dir: Path, config: dict) -> None:
    from transformers import Dots1Config
    from transformers import Dots1ForCausalLM as Reference

    torch.manual_seed(0)
    Reference(Dots1Config(**config)).save_pretrained(model_dir)


def _kv_bytes(config: dict, tokens: int, dtype: str) -> int:
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    return per_token * getattr(torch, dtype).itemsize * (tokens + 64 * 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on any device (CPU: code paths only)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run and not torch.cuda.is_available() else args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    triton = importlib.util.find_spec("triton")
    triton_version = importlib.import_module("triton").__version__ if triton else "missing"
    print(f"device {name}, torch {torch.__version__}, triton {triton_version}", flush=True)
    table = Table()
    start = time.perf_counter()
    bandwidth = 1.0
    with table.section("copy bandwidth"):
        bandwidth = copy_bandwidth(device)
        table.add("device copy bandwidth (read + write)", f"{bandwidth / 1e9:.0f} GB/s")
    kernel_self_checks(table, device)
    with table.section("parity"):
        parity(device, table.add, quick=args.dry_run)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        mid_size(table, device, args.dry_run, scratch)
        real_architecture(table, device, args.dry_run, scratch, bandwidth)
        with table.section("engine benchmark"):
            engine_benchmark(table, device, args.dry_run, scratch)
        with table.section("engine host time per step"):
            engine_host_time(table, device, args.dry_run)
    print(f"\n{name}, {time.perf_counter() - start:.0f} s\n" + "\n".join(table.rows), flush=True)


if __name__ == "__main__":
    main()
