"""Shared builders for the scheduler unit tests."""
import itertools

from scheduler.sampling_params import SamplingParams
from scheduler.sequence import Sequence

_seq_ids = itertools.count()


def make_seq(token_ids: list[int], max_tokens: int = 16, **params: object) -> Sequence:
    resolved = SamplingParams(max_tokens=max_tokens, **params).with_defaults({})
    seq_id = next(_seq_ids)
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        params=resolved,
    )


# A tiny Dots1 (random weights) for the decode-graph tests: one dense layer, then MoE layers of 8 experts, top-2.
GRAPH_TEST_CONFIG = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    max_position_embeddings=64, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)
