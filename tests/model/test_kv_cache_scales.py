"""Checkpoints with a compressed-tensors kv_cache_scheme: their per-layer k_scale/v_scale reach the attention layers,
the FP8 KV cache runs with them (Transformers with a cache rounded through float8 at those scales is the oracle),
--kv-cache-dtype auto picks fp8 for them, and every bad KV-scale checkpoint fails naming its file and key."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from dots1_reference import build_reference
from fp8_checkpoint import write_fp8_checkpoint
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file
from transformers import Dots1ForCausalLM as ReferenceDots1
from transformers.cache_utils import DynamicCache

from model.kv_cache import FP8_KV_DTYPE
from model.loader import load_model
from model.quantization import parse_quantization_config
from scheduler.config import EngineConfig
from scheduler.model_runner import ModelExecutor

TOLERANCE = 1e-4
DECODE_STEPS = 8
PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [7, 9, 2], list(range(40, 52))]
E4M3_MAX = 448.0
# llm-compressor's FP8 kv_cache_scheme, as it writes it into config.json.
KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
             "group_size": None, "block_structure": None, "observer": "minmax"}
# (k_scale, v_scale) per layer: not powers of two, so float8 rounds onto a grid different from scale 1.0's.
SCALES = {0: (0.375, 0.234375), 1: (0.0859375, 0.6875)}
BUDGET = 4 * 2**20


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("fp32")
    build_reference(model_dir, num_hidden_layers=2, n_shared_experts=2)
    return model_dir


@pytest.fixture(scope="module")
def fp8_pair(source, tmp_path_factory) -> tuple[Path, Path]:
    """(an FP8-dynamic checkpoint without KV scales, the checkpoint of its dequantized weights)."""
    root = tmp_path_factory.mktemp("fp8")
    write_fp8_checkpoint(source, root / "fp8", dequantized=root / "dequantized")
    return root / "fp8", root / "dequantized"


def with_kv_scales(checkpoint: Path, target: Path, scales: dict[int, tuple[float, float]] = SCALES, *,
                   spelling: str = "self_attn.{kv}_scale", shape: tuple[int, ...] = (),
                   dtype: torch.dtype = torch.bfloat16, scheme: dict | None = KV_SCHEME,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of ``checkpoint`` with per-layer KV scales (in ``spelling``) and ``scheme`` as its kv_cache_scheme."""
    target.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "model.safetensors":
            target.joinpath(path.name).write_bytes(path.read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    for layer, pair in scales.items():
        for kv, value in zip("kv", pair):
            key = f"model.layers.{layer}.{spelling.format(kv=kv)}"
            tensors[key] = torch.tensor(value, dtype=dtype).reshape(shape)
    tensors.update(extra or {})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:
        config["quantization_config"]["kv_cache_scheme"] = scheme
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def through_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as a float8 e4m3 cache at ``scale`` gives it back: round(x / scale) * scale, saturated at 448."""
    return (x.float() * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


class Fp8RoundedCache(DynamicCache):
    """Transformers' cache holding every layer's keys and values as a float8 cache at that layer's scales would."""

    def __init__(self, config, scales: dict[int, tuple[float, float]]) -> None:
        super().__init__(config=config)
        self.scales = scales

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_scale, v_scale = self.scales[layer_idx]
        return super().update(through_fp8(key_states, k_scale), through_fp8(value_states, v_scale), layer_idx,
                              *args, **kwargs)


@torch.no_grad()
def reference_outputs(dequantized: Path, scales: dict[int, tuple[float, float]], steps: int = DECODE_STEPS):
    """Per prompt: Transformers' (greedy tokens, log-probabilities of each decode step [steps, V])."""
    model = ReferenceDots1.from_pretrained(dequantized, attn_implementation="eager").eval()
    outputs = []
    for prompt in PROMPTS:
        cache = Fp8RoundedCache(model.config, scales)
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        tokens, steps_logits = [], []
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
            steps_logits.append(logits.float())
        outputs.append((tokens, torch.log_softmax(torch.stack(steps_logits), dim=-1)))
    return outputs


def engine_outputs(model, steps: int = DECODE_STEPS):
    """The same as ``reference_outputs`` from our model over a float8 paged cache, all prompts in one batch."""
    runner = PagedRunner(model, cache_dtype=FP8_KV_DTYPE)
    last = runner.step(dict(enumerate(PROMPTS)))
    tokens = [[int(logits.argmax())] for logits in last]
    steps_logits: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for _ in range(steps):
        for seq, logits in enumerate(runner.step({seq: [tokens[seq][-1]] for seq in range(len(PROMPTS))})):
            steps_logits[seq].append(logits)
            tokens[seq].append(int(logits.argmax()))
    return [(t[:steps], torch.log_softmax(torch.stack(s), dim=-1)) for t, s in zip(tokens, steps_logits)]


def max_difference(ours, reference) -> float:
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in reference]
    return max((a - b).abs().max().item() for (_, a), (_, b) in zip(ours, reference))


@pytest.mark.parametrize("spelling, shape, dtype", [
    ("self_attn.{kv}_scale", (), torch.bfloat16),
    ("self_attn.{kv}_scale", (1,), torch.float16),
    ("self_attn.{kv}_proj.output_scale", (1,), torch.float32),
])
def test_scales_load_onto_every_attention_layer(fp8_pair, tmp_path, spelling, shape, dtype):
    checkpoint = with_kv_scales(fp8_pair[0], tmp_path / "kv", spelling=spelling, shape=shape, dtype=dtype)
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    assert {i: (layer.self_attn.k_scale, layer.self_attn.v_scale) for i, layer in enumerate(model.layers)} == SCALES
    assert all(isinstance(layer.self_attn.k_scale, float) for layer in model.layers)
    plain = load_model(fp8_pair[0], dtype=torch.float32, device="cpu")
    assert all((layer.self_attn.k_scale, layer.self_attn.v_scale) == (1.0, 1.0) for layer in plain.layers)


def test_fp8_cache_with_loaded_scales_matches_transformers_at_those_scales(fp8_pair, tmp_path):
    checkpoint = with_kv_scales(fp8_pair[0], tmp_path / "kv")
    expected = reference_outputs(fp8_pair[1], SCALES)
    model = load_model(checkpoint, dtype=torch.float32, device="cpu", kv_cache_dtype=FP8_KV_DTYPE)
    assert model.attention_backend.name == "torch"
    assert max_difference(engine_outputs(model), expected) <= TOLERANCE
    # The comparison sees the scales: the same cache at scale 1.0 is measurably another model.
    unscaled = reference_outputs(fp8_pair[1], {layer: (1.0, 1.0) for layer in SCALES})
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(unscaled, expected)) > 20 * TOLERANCE


def test_triton_backend_with_loaded_scales_matches_transformers(fp8_pair, tmp_path):
    """Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1); few steps, each launch is slow."""
    checkpoint = with_kv_scales(fp8_pair[0], tmp_path / "kv")
    expected = reference_outputs(fp8_pair[1], SCALES, steps=2)
    model = load_model(checkpoint, dtype=torch.float32, device="cpu", attention_backend="triton",
                       kv_cache_dtype=FP8_KV_DTYPE)
    assert model.attention_backend.name == "triton"
    assert max_difference(engine_outputs(model, steps=2), expected) <= TOLERANCE


def test_auto_serves_a_calibrated_checkpoint_with_the_fp8_cache(fp8_pair, tmp_path, caplog):
    checkpoint = with_kv_scales(fp8_pair[0], tmp_path / "kv")
    with caplog.at_level(logging.INFO, logger="model.kv_cache"):
        auto = ModelExecutor(EngineConfig(model=str(checkpoint), dtype="float32", kv_cache_memory=BUDGET))
    executors = [auto]
    try:
        assert auto.kv_cache_dtype == FP8_KV_DTYPE and auto.kv_caches[0][0].dtype == FP8_KV_DTYPE
        assert auto.model.layers[1].self_attn.k_scale == SCALES[1][0]
        notes = [r.message for r in caplog.records if "kv_cache_scheme" in r.message]
        assert len(notes) == 1 and "float8_e4m3fn" in notes[0]
        # The flag given explicitly wins; a checkpoint without scales keeps the model dtype under auto.
        executors.append(ModelExecutor(EngineConfig(model=str(checkpoint), dtype="float32", kv_cache_dtype="model",
                                                    kv_cache_memory=BUDGET)))
        executors.append(ModelExecutor(EngineConfig(model=str(fp8_pair[0]), dtype="float32",
                                                    kv_cache_memory=BUDGET)))
        assert [executor.kv_cache_dtype for executor in executors[1:]] == [torch.float32, torch.float32]
        assert executors[1].num_kv_blocks * 4 == auto.num_kv_blocks
    finally:
        for executor in executors:
            executor.shutdown()


BAD_SCALES = {
    "zero": ({0: (0.0, 0.5), 1: (0.5, 0.5)}, {}, "model.layers.0.self_attn.k_scale", "positive finite"),
    "negative": ({0: (0.5, -0.25), 1: (0.5, 0.5)}, {}, "model.layers.0.self_attn.v_scale", "positive finite"),
    "nan": ({0: (0.5, 0.5), 1: (math.nan, 0.5)}, {}, "model.layers.1.self_attn.k_scale", "positive finite"),
    "infinite": ({0: (0.5, 0.5), 1: (0.5, math.inf)}, {}, "model.layers.1.self_attn.v_scale", "positive finite"),
    "wrong_shape": (SCALES, {"model.layers.1.self_attn.k_scale": torch.tensor([0.5, 0.5])},
                    "model.layers.1.self_attn.k_scale", r"has shape \[2\]"),
    "integer": (SCALES, {"model.layers.0.self_attn.v_scale": torch.tensor(1, dtype=torch.int32)},
                "model.layers.0.self_attn.v_scale", "dtype I32"),
    "missing": ({0: (0.5, 0.5)}, {"model.layers.1.self_attn.k_scale": torch.tensor(0.5)},
                "model.layers.1.self_attn.v_scale", "has a kv_cache_scheme, but the checkpoint has no"),
    "both_spellings": (SCALES, {"model.layers.0.self_attn.k_proj.output_scale": torch.tensor(0.5)},
                       "model.layers.0.self_attn.k_proj.output_scale", "already given by"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_bad_kv_scales_fail_naming_file_and_key(fp8_pair, tmp_path, case):
    scales, extra, key, message = BAD_SCALES[case]
    checkpoint = with_kv_scales(fp8_pair[0], tmp_path / "kv", scales, extra=extra)
    with pytest.raises(ValueError, match=message) as error:
        load_model(checkpoint, dtype=torch.float32, device="cpu")
    assert key in str(error.value)
    assert str(checkpoint / "model.safetensors") in str(error.value)


@pytest.mark.parametrize("quantized", [True, False])
def test_scale_keys_without_a_kv_cache_scheme_are_refused(fp8_pair, source, tmp_path, quantized):
    """On an FP8 checkpoint whose kv_cache_scheme is null, and on an unquantized one."""
    checkpoint = with_kv_scales(fp8_pair[0] if quantized else source, tmp_path / "kv",
                                spelling="self_attn.{kv}_proj.output_scale", scheme=None)
    with pytest.raises(ValueError, match="no kv_cache_scheme") as error:
        load_model(checkpoint, dtype=torch.float32, device="cpu")
    assert "model.layers.0.self_attn.k_proj.output_scale" in str(error.value)
    assert str(checkpoint / "model.safetensors") in str(error.value)


def fp8_config(kv_cache_scheme) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "kv_cache_scheme": kv_cache_scheme}


def test_the_static_fp8_kv_cache_scheme_is_accepted():
    assert parse_quantization_config(fp8_config(KV_SCHEME)).kv_cache_scales
    assert not parse_quantization_config(fp8_config(None)).kv_cache_scales


@pytest.mark.parametrize("change, message", [
    ({"strategy": "head"}, "kv_cache_scheme strategy 'head' is not supported"),
    ({"strategy": "channel"}, "kv_cache_scheme strategy 'channel' is not supported"),
    ({"type": "int"}, "kv_cache_scheme: 8-bit 'int' is not supported"),
    ({"num_bits": 4}, "kv_cache_scheme: 4-bit 'float' is not supported"),
    ({"dynamic": True}, "kv_cache_scheme: dynamic KV-cache scales are not supported"),
    ({"symmetric": False}, "kv_cache_scheme: asymmetric quantization"),
    ({"mystery": 1}, r"kv_cache_scheme has unknown key\(s\) \['mystery'\]"),
])
def test_other_kv_cache_schemes_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization_config(fp8_config({**KV_SCHEME, **change}))
