"""Decode step time of a real-architecture slice of dots.llm1 in bf16 against the same slice with FP8 weights.

The slice is configs/dots.llm1.inst with fewer layers (layer 0 dense, the rest MoE; real hidden size, heads and
experts) and random weights; FP8 is the published FP8-dynamic scheme (W8A8 on compute capability 8.9+, weight-only
elsewhere). Each batch size decodes one token per sequence over a prompt of --context tokens already cached.

    PYTHONPATH=. python bench/fp8_decode_bench.py                               # on a CUDA machine
    PYTHONPATH=. python bench/fp8_decode_bench.py --device cpu --layers 2 --experts 8 --batches 1 --steps 2
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.forward_batch import ForwardBatch  # noqa: E402
from model.kv_cache import allocate_kv_cache  # noqa: E402
from model.loader import load_model, weight_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16


def slice_config(model_dir: Path, layers: int, experts: int | None) -> None:
    raw = json.loads((REPO / "configs" / "dots.llm1.inst" / "config.json").read_text())
    raw["num_hidden_layers"] = layers
    if experts is not None:
        raw["n_routed_experts"] = experts
    (model_dir / "config.json").write_text(json.dumps(raw))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms(model, device: torch.device, batch: int, context: int, steps: int) -> float:
    blocks_per_seq = -(-(context + steps + 1) // BLOCK_SIZE)
    kv_caches = allocate_kv_cache(model.config, batch * blocks_per_seq, BLOCK_SIZE, torch.bfloat16, device)
    tables = [list(range(seq * blocks_per_seq, (seq + 1) * blocks_per_seq)) for seq in range(batch)]
    prompt = [[(7 * seq + i) % 1000 for i in range(context)] for seq in range(batch)]
    model(ForwardBatch.build(prompt, [0] * batch, tables, BLOCK_SIZE).to(device), kv_caches)
    step = ForwardBatch.build([[1]] * batch, [context] * batch, tables, BLOCK_SIZE).to(device)
    model(step, kv_caches)  # warm-up: kernels compiled, tiles dequantized once
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        model(step, kv_caches)
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, help="fewer routed experts than the real 128 (CPU dry runs)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        slice_config(model_dir, args.layers, args.experts)
        for name, quantization in (("bf16", None), ("fp8", "fp8")):
            model = load_model(model_dir, dtype=torch.bfloat16, device=device, load_format="dummy",
                               quantization=quantization)
            dtype, weight_bytes = weight_summary(model)
            times = [decode_ms(model, device, batch, args.context, args.steps) for batch in args.batches]
            rows.append((name, dtype, weight_bytes, times))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"dots.llm1 slice: {args.layers} layers, {args.experts or 128} experts, context {args.context}, "
          f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'weights':<8} {'dtype':<28} {'GiB':>6} " + " ".join(f"{f'batch {b} ms':>12}" for b in args.batches))
    for name, dtype, weight_bytes, times in rows:
        print(f"{name:<8} {dtype:<28} {weight_bytes / 2**30:>6.2f} " + " ".join(f"{t:>12.2f}" for t in times))
    speedups = " ".join(f"{bf16 / fp8:>12.2f}" for bf16, fp8 in zip(rows[0][3], rows[1][3]))
    print(f"{'bf16/fp8':<8} {'':<28} {'':>6} {speedups}")


if __name__ == "__main__":
    main()
