"""RoPE frequencies against Transformers' rope utilities, and the per-layer expert assignment counters."""
import pytest
import torch
from dots1_reference import build_reference
from paged_runner import PagedRunner
from transformers import Dots1Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model.config import ModelConfig
from model.loader import load_model
from model.rope import RotaryEmbedding

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 256,
             "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def configs(rope: dict) -> tuple[ModelConfig, Dots1Config]:
    fields = dict(vocab_size=64, hidden_size=64, num_attention_heads=2, head_dim=32, num_hidden_layers=1,
                  max_position_embeddings=1024, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  moe_intermediate_size=8, sliding_window=None)
    return (ModelConfig.from_dict({"model_type": "dots1", **fields, "rope_parameters": dict(rope)}),
            Dots1Config(**fields, rope_parameters=dict(rope)))


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_frequencies_match_transformers(name):
    ours, theirs = configs(ROPES[name])
    rotary = RotaryEmbedding(ours.rope, ours.head_dim, ours.max_position_embeddings)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[ours.rope.rope_type](theirs)
    assert torch.equal(rotary.inv_freq, inv_freq)
    assert rotary.attention_scaling == pytest.approx(scaling)
    if ours.rope.rope_type == "yarn":
        assert rotary.attention_scaling != 1.0


def test_dynamic_rope_rescales_per_sequence_length():
    ours, theirs = configs(ROPES["dynamic"])
    rotary = RotaryEmbedding(ours.rope, ours.head_dim, ours.max_position_embeddings)
    positions = torch.tensor([5, 1500, 3000])
    seq_lens = torch.tensor([600, 1501, 3001])
    cos, _ = rotary(positions, seq_lens, torch.float32)
    for row, (position, seq_len) in enumerate(zip(positions.tolist(), seq_lens.tolist())):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](theirs, seq_len=torch.tensor(seq_len))
        if seq_len <= ours.max_position_embeddings:
            inv_freq = rotary.inv_freq
        expected = torch.cat([position * inv_freq] * 2).cos()
        assert torch.allclose(cos[row], expected, atol=1e-6), row


def test_expert_counts_equal_router_assignments(tmp_path):
    reference = build_reference(tmp_path, num_hidden_layers=3, first_k_dense_replace=1, num_experts_per_tok=3)
    chosen: dict[int, torch.Tensor] = {}
    for layer_id, layer in enumerate(reference.model.layers):
        if layer_id >= 1:
            layer.mlp.gate.register_forward_hook(
                lambda module, args, output, layer_id=layer_id: chosen.__setitem__(layer_id, output[2].reshape(-1)))
    model = load_model(tmp_path, dtype=torch.float32, device="cpu", expert_metrics=True)
    prompt = [4, 8, 15, 16, 23, 42, 7]
    PagedRunner(model).step({0: prompt})
    layer_ids, counts = model.take_expert_counts()
    assert layer_ids == [1, 2]
    assert counts.dtype == torch.int64 and counts.shape == (2, 8)
    assert counts.sum(dim=1).tolist() == [len(prompt) * 3] * 2
    with torch.no_grad():
        reference(input_ids=torch.tensor([prompt]))
    for row, layer_id in enumerate(layer_ids):
        assert counts[row].tolist() == torch.bincount(chosen[layer_id], minlength=8).tolist()
    _, after_reset = model.take_expert_counts()
    assert after_reset.sum() == 0


def test_expert_counts_disabled_by_default(tmp_path):
    build_reference(tmp_path, num_hidden_layers=2)
    assert load_model(tmp_path, dtype=torch.float32, device="cpu").take_expert_counts() is None
