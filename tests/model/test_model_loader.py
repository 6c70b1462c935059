"""Checkpoint loading: both expert layouts, sharded files, dtype handling, dummy weights and every bad checkpoint."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from dots1_reference import build_reference
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file

from model.loader import load_model

PROMPTS = {0: [3, 14, 15, 92, 65], 1: [35, 89, 79, 32, 38, 46, 26]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("checkpoint")
    build_reference(model_dir, num_hidden_layers=2)
    return model_dir


@pytest.fixture
def writable(checkpoint, tmp_path) -> Path:
    """A private copy of the checkpoint to damage."""
    model_dir = tmp_path / "copy"
    shutil.copytree(checkpoint, model_dir)
    return model_dir


def logits_of(model_dir: Path) -> torch.Tensor:
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    return torch.cat(PagedRunner(model).step(PROMPTS, all_logits=True))


def rewrite_tensors(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def fuse_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Rewrites per-expert keys into Transformers 5's in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    layers = {key.split(".mlp.experts.")[0] for key in tensors if ".mlp.experts." in key}
    for layer in layers:
        prefix = f"{layer}.mlp.experts"
        num_experts = len({k for k in tensors if k.startswith(prefix) and k.endswith("down_proj.weight")})
        gate_up = [torch.cat([tensors.pop(f"{prefix}.{e}.gate_proj.weight"),
                              tensors.pop(f"{prefix}.{e}.up_proj.weight")]) for e in range(num_experts)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack([tensors.pop(f"{prefix}.{e}.down_proj.weight")
                                                      for e in range(num_experts)])


def test_fused_expert_layout_loads_the_same_weights(checkpoint, writable):
    rewrite_tensors(writable, fuse_experts)
    assert torch.equal(logits_of(writable), logits_of(checkpoint))


def test_sharded_checkpoint_with_index_loads_the_same_weights(checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded)
    (sharded / "model.safetensors").unlink()
    tensors = load_file(checkpoint / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for shard_index, shard_keys in enumerate((keys[0::3], keys[1::3], keys[2::3])):
        name = f"model-{shard_index + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in shard_keys}, sharded / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in shard_keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(logits_of(sharded), logits_of(checkpoint))


def test_transformers_sharded_save_loads(tmp_path):
    reference = build_reference(tmp_path / "single", num_hidden_layers=2)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert torch.equal(logits_of(tmp_path / "sharded"), logits_of(tmp_path / "single"))


def test_bfloat16_load_keeps_router_in_float32(checkpoint):
    model = load_model(checkpoint, dtype=torch.bfloat16, device="cpu")
    moe = model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.w13[0].dtype == torch.bfloat16
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    bias = load_file(checkpoint / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(moe.gate.e_score_correction_bias, bias)
    logits = torch.cat(PagedRunner(model).step(PROMPTS, all_logits=True))
    assert logits.dtype == torch.float32
    assert (logits - logits_of(checkpoint)).abs().max() < 0.5


def test_rotary_inv_freq_buffers_in_checkpoint_are_ignored(checkpoint, writable):
    rewrite_tensors(writable, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(4)}))
    assert torch.equal(logits_of(writable), logits_of(checkpoint))


def test_dummy_weights_need_no_checkpoint_and_are_deterministic(checkpoint, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(checkpoint / "config.json", config_only / "config.json")
    first = load_model(config_only, dtype=torch.float32, device="cpu", load_format="dummy")
    second = load_model(config_only, dtype=torch.float32, device="cpu", load_format="dummy")
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a.to_dense(), b.to_dense()), name
    assert first.layers[0].self_attn.qkv_proj.weight.to_dense().std() > 0
    logits = torch.cat(PagedRunner(first).step(PROMPTS))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_unknown_load_format_is_refused(checkpoint):
    with pytest.raises(ValueError, match="load_format 'pt'"):
        load_model(checkpoint, dtype=torch.float32, device="cpu", load_format="pt")


def damage_missing_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()


def damage_model_type(model_dir: Path) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    raw["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(raw))


def damage_missing_tensor(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))


def damage_extra_tensor(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.update({"model.layers.7.mlp.gate.weight": torch.zeros(8, 32)}))


def damage_shape(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 32)}))


def damage_header(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"this is not a safetensors header"
    path.write_bytes(bytes(data))


def damage_index(model_dir: Path) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    half = sorted(tensors)[: len(tensors) // 2]
    save_file({k: tensors[k] for k in half}, model_dir / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" if k in half else "model-00002-of-00002.safetensors"
                  for k in tensors}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def damage_no_weights(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()


BAD_CHECKPOINTS = {
    "missing_config": (damage_missing_config, r"config\.json not found"),
    "unknown_model_type": (damage_model_type, r"config\.json: unsupported model_type 'llama'"),
    "missing_tensor": (damage_missing_tensor, r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"),
    "extra_tensor": (damage_extra_tensor,
                     r"model\.safetensors: unexpected tensor 'model\.layers\.7\.mlp\.gate\.weight'"),
    "shape_mismatch": (damage_shape,
                       r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
                       r"has shape \[16, 32\]"),
    "corrupt_header": (damage_header, r"model\.safetensors: corrupt or unreadable safetensors file"),
    "index_missing_shard": (damage_index,
                            r"model\.safetensors\.index\.json: points at missing shard 'model-00002-of-00002"),
    "no_weights": (damage_no_weights, r"no model\.safetensors or model\.safetensors\.index\.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_fails_with_file_and_key(writable, case):
    damage, message = BAD_CHECKPOINTS[case]
    damage(writable)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_model(writable, dtype=torch.float32, device="cpu")
