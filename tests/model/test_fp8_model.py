"""FP8 checkpoints (compressed-tensors) and --quantization fp8: 8-bit weights in memory, and in float32 on the CPU
exactly the model of the dequantized weights (Transformers' Dots1ForCausalLM on them is the oracle)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from dots1_reference import build_reference, reference_generate
from fp8_checkpoint import LINEAR_WEIGHT, write_fp8_checkpoint
from paged_runner import PagedRunner
from safetensors.torch import load_file
from test_model_loader import fuse_experts, rewrite_tensors
from transformers import Dots1ForCausalLM as ReferenceDots1

from model.loader import load_model, weight_summary

TOLERANCE = 1e-4
DECODE_STEPS = 12
PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [7, 9, 2], list(range(40, 52))]
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("fp32")
    build_reference(model_dir, num_hidden_layers=2, n_shared_experts=2)
    return model_dir


def quantized(source: Path, root: Path, **options) -> tuple[Path, Path]:
    """(the FP8 checkpoint, the checkpoint of its dequantized weights)."""
    write_fp8_checkpoint(source, root / "fp8", dequantized=root / "dequantized", **options)
    return root / "fp8", root / "dequantized"


def reference_outputs(dequantized: Path) -> list[tuple[torch.Tensor, list[int], list[torch.Tensor]]]:
    reference = ReferenceDots1.from_pretrained(dequantized, attn_implementation="eager").eval()
    return [reference_generate(reference, prompt, DECODE_STEPS) for prompt in PROMPTS]


def greedy_run(model) -> tuple[list[torch.Tensor], list[list[int]], list[list[torch.Tensor]]]:
    """Prompt logits, greedy tokens and each decode step's logits, all sequences in one batch."""
    runner = PagedRunner(model)
    prompt_logits = runner.step(dict(enumerate(PROMPTS)), all_logits=True)
    tokens = [[int(logits[-1].argmax())] for logits in prompt_logits]
    steps: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for _ in range(DECODE_STEPS):
        outputs = runner.step({seq: [tokens[seq][-1]] for seq in range(len(PROMPTS))})
        for seq, logits in enumerate(outputs):
            steps[seq].append(logits)
            tokens[seq].append(int(logits.argmax()))
    return prompt_logits, [t[:DECODE_STEPS] for t in tokens], steps


def assert_matches_reference(model, expected) -> None:
    prompt_logits, tokens, steps = greedy_run(model)
    for seq, (ref_prompt, ref_tokens, ref_steps) in enumerate(expected):
        assert tokens[seq] == ref_tokens, f"sequence {seq} diverged"
        logprobs = torch.log_softmax(torch.stack(steps[seq]), dim=-1)
        ref_logprobs = torch.log_softmax(torch.stack(ref_steps), dim=-1)
        assert (logprobs - ref_logprobs).abs().max().item() <= TOLERANCE, f"sequence {seq} decode logprobs"
        assert (prompt_logits[seq] - ref_prompt).abs().max().item() <= TOLERANCE, f"sequence {seq} prompt logits"
        assert ref_prompt.std() > 0.5


def test_fp8_dynamic_checkpoint_keeps_8_bit_weights(source, tmp_path):
    fp8_dir, _ = quantized(source, tmp_path)
    model = load_model(fp8_dir, dtype=torch.float32, device="cpu")
    dtype, weight_bytes = weight_summary(model)
    assert dtype == "float8_e4m3fn+float32"
    full = load_model(source, dtype=torch.float32, device="cpu")
    tensors = load_file(source / "model.safetensors")
    linear = [t for key, t in tensors.items() if LINEAR_WEIGHT.search(key)]
    # Every Linear weight element went from 4 bytes to 1, plus one float32 scale per output row.
    saved = sum(3 * t.numel() - 4 * t.shape[0] for t in linear)
    assert weight_bytes == weight_summary(full)[1] - saved
    assert model.layers[1].mlp.experts.w13.dtype == model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    assert model.layers[1].mlp.gate.weight.dtype == model.lm_head.weight.dtype == torch.float32


def test_fp8_dynamic_checkpoint_matches_transformers_on_the_dequantized_weights(source, tmp_path):
    fp8_dir, dequantized = quantized(source, tmp_path)
    assert_matches_reference(load_model(fp8_dir, dtype=torch.float32, device="cpu"), reference_outputs(dequantized))


def test_per_tensor_weight_only_fp16_scales_and_ignore_patterns(source, tmp_path):
    ignore = ("lm_head", "re:.*mlp.gate$", "re:.*shared_experts.*", "model.layers.0.self_attn.o_proj")
    fp8_dir, dequantized = quantized(source, tmp_path, strategy="tensor", scale_dtype=torch.float16, dynamic=False,
                                     ignore=ignore, config_key="compression_config")
    model = load_model(fp8_dir, dtype=torch.float32, device="cpu")
    assert model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    assert model.layers[1].self_attn.o_proj.weight.dtype == FP8
    assert model.layers[1].mlp.shared_experts.gate_up_proj.weight.dtype == torch.float32
    assert_matches_reference(model, reference_outputs(dequantized))


def test_fused_expert_layout_with_scales(source, tmp_path):
    fp8_dir, _ = quantized(source, tmp_path, strategy="channel", scale_dtype=torch.float32)
    fused = tmp_path / "fused"
    shutil.copytree(fp8_dir, fused)

    def fuse(tensors: dict[str, torch.Tensor]) -> None:
        """Experts' weights into [E, 2I, H] / [E, H, I], their [rows, 1] scales likewise into [E, 2I, 1] / [E, H, 1]."""
        scales = {key.removesuffix("_scale"): tensors.pop(key) for key in list(tensors)
                  if ".experts." in key and key.endswith("_scale")}
        fuse_experts(scales)
        fuse_experts(tensors)
        tensors.update({f"{key}_scale": value for key, value in scales.items()})

    rewrite_tensors(fused, fuse)
    assert "model.layers.1.mlp.experts.gate_up_proj_scale" in load_file(fused / "model.safetensors")
    per_expert = torch.cat(PagedRunner(load_model(fp8_dir, dtype=torch.float32, device="cpu")).step(
        dict(enumerate(PROMPTS)), all_logits=True))
    stacked = torch.cat(PagedRunner(load_model(fused, dtype=torch.float32, device="cpu")).step(
        dict(enumerate(PROMPTS)), all_logits=True))
    assert torch.equal(per_expert, stacked)


def test_online_fp8_of_a_bf16_checkpoint_is_the_prequantized_model(source, tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(source, bf16)
    rewrite_tensors(bf16, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    write_fp8_checkpoint(bf16, tmp_path / "fp8", scale_dtype=torch.float32)
    online = load_model(bf16, dtype=torch.float32, device="cpu", quantization="fp8")
    prequantized = load_model(tmp_path / "fp8", dtype=torch.float32, device="cpu")
    online_params, pre_params = dict(online.named_parameters()), dict(prequantized.named_parameters())
    assert online_params.keys() == pre_params.keys()
    for name, param in pre_params.items():
        assert param.dtype == online_params[name].dtype, name
        assert torch.equal(param.to_dense().float(), online_params[name].to_dense().float()), name
    assert online.layers[1].mlp.gate.weight.dtype == online.lm_head.weight.dtype == torch.float32
    logits = [torch.cat(PagedRunner(m).step(dict(enumerate(PROMPTS)), all_logits=True)) for m in (online, prequantized)]
    assert torch.equal(*logits)


def test_bfloat16_compute_with_fp8_weights_is_as_close_as_bfloat16_is(source, tmp_path):
    """FP8 weights dequantized into bfloat16 tiles stray from float32 no further than bfloat16 weights do."""
    fp8_dir, dequantized = quantized(source, tmp_path)

    def logits(model_dir: Path, dtype: torch.dtype) -> torch.Tensor:
        model = load_model(model_dir, dtype=dtype, device="cpu")
        return torch.cat(PagedRunner(model).step(dict(enumerate(PROMPTS)), all_logits=True))

    in_bf16 = load_model(fp8_dir, dtype=torch.bfloat16, device="cpu")
    assert in_bf16.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    assert weight_summary(in_bf16)[0] == "float8_e4m3fn+bfloat16+float32"  # the router stays in float32
    exact = logits(dequantized, torch.float32)
    fp8_error = (logits(fp8_dir, torch.bfloat16) - exact).abs().mean()
    bf16_error = (logits(dequantized, torch.bfloat16) - exact).abs().mean()
    assert fp8_error < 1.5 * bf16_error


def damage(key: str, edit):
    def apply(model_dir: Path) -> None:
        rewrite_tensors(model_dir, lambda tensors: edit(tensors, key))
    return apply


ATTN = "model.layers.0.self_attn.q_proj.weight"
EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
BAD_FP8 = {
    "missing_scale": (damage(EXPERT, lambda t, k: t.pop(f"{k}_scale")),
                      rf"model\.safetensors: float8 tensor '{EXPERT}' has no scale '{EXPERT}_scale'"),
    "scale_shape": (damage(ATTN, lambda t, k: t.update({f"{k}_scale": t[f"{k}_scale"][:5]})),
                    rf"model\.safetensors: tensor '{ATTN}_scale' has shape \[5, 1\]"),
    "scale_dtype": (damage(ATTN, lambda t, k: t.update({f"{k}_scale": t[f"{k}_scale"].to(FP8)})),
                    rf"model\.safetensors: tensor '{ATTN}_scale' has dtype F8_E4M3, expected a scale in"),
    "ignored_but_quantized": (damage("lm_head.weight", lambda t, k: t.update({k: t[k].to(FP8)})),
                              r"model\.safetensors: tensor 'lm_head\.weight' is float8 \(F8_E4M3\), but this model "
                              r"keeps it in high precision"),
    "scale_of_ignored": (damage("lm_head.weight", lambda t, k: t.update({f"{k}_scale": torch.ones(96, 1)})),
                         r"model\.safetensors: unexpected tensor 'lm_head\.weight_scale': a float8 scale for a weight "
                         r"this model keeps in high precision"),
    "router_quantized": (damage("model.layers.1.mlp.gate.weight", lambda t, k: t.update({k: t[k].to(FP8)})),
                         r"tensor 'model\.layers\.1\.mlp\.gate\.weight' is float8"),
    "unquantized_target": (damage(ATTN, lambda t, k: t.update({k: t[k].float()})),
                           rf"model\.safetensors: tensor '{ATTN}' is F32, but quantization_config quantizes it"),
}


@pytest.mark.parametrize("case", sorted(BAD_FP8))
def test_bad_fp8_checkpoint_fails_with_file_and_key(source, tmp_path, case):
    fp8_dir, _ = quantized(source, tmp_path)
    edit, message = BAD_FP8[case]
    edit(fp8_dir)
    with pytest.raises(ValueError, match=message):
        load_model(fp8_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["no_quantization_config", "online_fp8"])
def test_float8_tensors_need_their_quantization_config(source, tmp_path, quantization):
    fp8_dir, _ = quantized(source, tmp_path)
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: (tensor '.*' is float8 \(F8_E4M3\)|unexpected "
                                         r"tensor '.*_scale': a float8 scale)"):
        load_model(fp8_dir, dtype=torch.float32, device="cpu", quantization=quantization)


def test_unsupported_quantization_in_config_json_is_refused_at_load(source, tmp_path):
    fp8_dir, _ = quantized(source, tmp_path)
    config = fp8_dir / "config.json"
    config.write_text(config.read_text().replace('"float-quantized"', '"pack-quantized"'))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config format 'pack-quantized'"):
        load_model(fp8_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model(source, dtype=torch.float32, device="cpu", quantization="int3")


def test_dummy_fp8_weights(source, tmp_path):
    fp8_dir, _ = quantized(source, tmp_path)
    (fp8_dir / "model.safetensors").unlink()
    model = load_model(fp8_dir, dtype=torch.float32, device="cpu", load_format="dummy")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    logits = torch.cat(PagedRunner(model).step(dict(enumerate(PROMPTS))))
    assert torch.isfinite(logits).all() and logits.std() > 0



def test_a_fused_matmul_half_quantized_is_refused(source, tmp_path):
    """q, k and v (and gate and up) run as one matmul here, so an ignore list that splits them is refused."""
    fp8_dir, _ = quantized(source, tmp_path, ignore=("lm_head", "model.layers.1.self_attn.k_proj"))
    with pytest.raises(ValueError, match=r"quantization_config quantizes \['model\.layers\.1\.self_attn\.q_proj', "
                                         r"'model\.layers\.1\.self_attn\.v_proj'\] but not all of"):
        load_model(fp8_dir, dtype=torch.float32, device="cpu")


def test_online_fp8_of_the_fused_expert_layout(source, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(source, fused)
    rewrite_tensors(fused, fuse_experts)
    logits = [torch.cat(PagedRunner(load_model(model_dir, dtype=torch.float32, device="cpu", quantization="fp8")).step(
        dict(enumerate(PROMPTS)), all_logits=True)) for model_dir in (source, fused)]
    assert torch.equal(*logits)
