"""A checkpoint quantized into the compressed-tensors FP8 layout, as llm-compressor writes dots.llm1.inst-FP8-dynamic,
and the same weights dequantized (what Transformers runs as the oracle).

Written here from the format's description (checkpoint-formats.md), independently of the engine's own code.
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
# Every Linear of Dots1 in Transformers' per-expert checkpoint naming; the router (mlp.gate) is no Linear there.
LINEAR_WEIGHT = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def compressed_tensors_config(strategy: str = "channel", dynamic: bool = True,
                              ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "observer": "minmax"}
    activations = ({"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                    "observer": None} if dynamic else None)
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": list(ignore), "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                          "output_activations": None}}}


def is_ignored(key: str, ignore: tuple[str, ...]) -> bool:
    module = key.removesuffix(".weight")
    return any(re.match(name[3:], module) if name.startswith("re:") else name == module for name in ignore)


def quantize(weight: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, scale [out, 1] or [1] in scale_dtype) with weight ~= q * scale."""
    wide = weight.float()
    amax = wide.abs().amax(dim=1, keepdim=True) if strategy == "channel" else wide.abs().amax().reshape(1)
    scale = (amax / E4M3_MAX).to(scale_dtype)
    divisor = scale.float() if strategy == "channel" else scale.float()[:, None]
    return (wide / divisor).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(source: Path, target: Path, *, strategy: str = "channel",
                         scale_dtype: torch.dtype = torch.bfloat16, dynamic: bool = True,
                         ignore: tuple[str, ...] = ("lm_head",), config_key: str = "quantization_config",
                         dequantized: Path | None = None) -> None:
    """Quantizes ``source``'s model.safetensors into ``target``; with ``dequantized``, also writes the checkpoint of
    exactly the values the FP8 one stands for (quantized weights dequantized, the rest as in ``source``)."""
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    quantized, widened = {}, {}
    for key, tensor in tensors.items():
        if LINEAR_WEIGHT.search(key) and not is_ignored(key, ignore):
            weight, scale = quantize(tensor, strategy, scale_dtype)
            quantized[key], quantized[f"{key}_scale"] = weight, scale
            widened[key] = weight.float() * scale.float().reshape(-1, 1)  # what float32 compute multiplies by
        else:
            quantized[key] = widened[key] = tensor
    save_file(quantized, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config[config_key] = compressed_tensors_config(strategy, dynamic, ignore)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    if dequantized is not None:
        shutil.copytree(source, dequantized)
        save_file(widened, dequantized / "model.safetensors", metadata={"format": "pt"})
