"""CPU process memory of a real server on the same weights in bf16, as an FP8 (compressed-tensors) checkpoint, and
as the bf16 checkpoint quantized while loading (--quantization fp8).

    python bench/fp8_memory_bench.py [--work-dir /tmp/fp8-bench] [--threads 2]

The model is the mid-size benchmark config (bench/mid_size.py) with the embedded tokenizer's 4096-token
vocabulary, in bf16. Each server computes in bfloat16 on the CPU; after it is ready it serves a few greedy
completions, then its resident memory (VmRSS) and peak (VmHWM, which includes loading) are read from /proc.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mid_size import MID_SIZE  # noqa: E402
from model.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from model.fp8 import quantize_rows  # noqa: E402

LINEAR_SUFFIXES = tuple(f"{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
FP8_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
    "config_groups": {"group_0": {
        "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
}


def write_checkpoints(work_dir: Path) -> tuple[Path, Path]:
    from transformers import Dots1Config, Dots1ForCausalLM

    bf16, fp8 = work_dir / "bf16", work_dir / "fp8"
    if not (bf16 / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = Dots1ForCausalLM(Dots1Config(**{**MID_SIZE, "vocab_size": 4096})).to(torch.bfloat16)
        model.save_pretrained(bf16)
        for name in TOKENIZER_FILES:
            shutil.copy(EMBEDDED_MODEL_DIR / name, bf16 / name)
        del model
    if not (fp8 / "model.safetensors").is_file():
        shutil.copytree(bf16, fp8, dirs_exist_ok=True)
        tensors = load_file(bf16 / "model.safetensors")
        quantized = {}
        for key, tensor in tensors.items():
            if key.endswith(LINEAR_SUFFIXES):
                quantized[key], scale = quantize_rows(tensor)
                quantized[f"{key}_scale"] = scale.to(torch.bfloat16)[:, None]
            else:
                quantized[key] = tensor
        save_file(quantized, fp8 / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((bf16 / "config.json").read_text())
        (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}, indent=2))
    return bf16, fp8


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def serve_and_measure(model_dir: Path, flags: list[str], threads: int, port: int) -> dict[str, float]:
    args = [sys.executable, "-m", "server", "--model", str(model_dir), "--dtype", "bfloat16", "--device", "cpu",
            "--port", str(port), "--kv-cache-memory", "64MiB", "--no-expert-metrics", "--log-level", "warning",
            *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready_s = time.monotonic() - start
        decode_start = time.monotonic()
        for prompt in ([11, 12, 13, 14], [100, 200, 300]):
            response = httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": model_dir.name, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            response.raise_for_status()
        decode_s = time.monotonic() - decode_start
        memory = memory_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"rss_mib": memory["VmRSS"] / 1024, "peak_mib": memory["VmHWM"] / 1024, "ready_s": ready_s,
            "two_completions_s": decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fp8-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bf16, fp8 = write_checkpoints(args.work_dir)
    linear = sum(t.numel() for k, t in load_file(bf16 / "model.safetensors").items() if k.endswith(LINEAR_SUFFIXES))
    print(f"mid-size model, vocab 4096: {linear / 1e6:.0f}M Linear weights; "
          f"checkpoints {(bf16 / 'model.safetensors').stat().st_size / 2**20:.0f} MiB (bf16), "
          f"{(fp8 / 'model.safetensors').stat().st_size / 2**20:.0f} MiB (fp8)")
    runs = {"bf16 checkpoint": (bf16, []), "fp8 checkpoint": (fp8, []),
            "bf16 + --quantization fp8": (bf16, ["--quantization", "fp8"])}
    print(f"{'served':<28} {'RSS MiB':>9} {'peak MiB':>9} {'ready s':>8} {'2 x 16 tokens s':>16}")
    for name, (model_dir, flags) in runs.items():
        result = serve_and_measure(model_dir, flags, args.threads, args.port)
        print(f"{name:<28} {result['rss_mib']:>9.0f} {result['peak_mib']:>9.0f} {result['ready_s']:>8.1f} "
              f"{result['two_completions_s']:>16.1f}")


if __name__ == "__main__":
    main()
