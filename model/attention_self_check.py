"""A start-up self-check of the Triton attention kernels against the torch reference, on the serving device.

For each attention window the model uses, two tiny forwards over shuffled block tables: a mixed batch (a chunked
prefill over a cached prefix, a fresh prefill and a decode) and a pure-decode batch long enough to be split, each
with a padded row (slot -1, context 0) the way a CUDA-graph runner pads. One kv head with the model's query group
and head size keeps it cheap. Each backend stores into its own copy of the same random cache; outputs and caches
must agree. Triton itself loads only when the check runs (``TritonAttentionBackend()``).
"""
import random
from dataclasses import dataclass

import torch

from model.attention_backend import TorchAttentionBackend, TritonAttentionBackend
from model.forward_batch import ForwardBatch
from model.self_check import SelfCheckResult

BLOCK_SIZE = 16
NUM_BLOCKS = 24
CHECK_NAME = "check_triton_attention"
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class _Layer:
    scale: float
    window: int | None
    k_scale: float
    v_scale: float


def check_triton_attention(device: torch.device | str, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None,
                           head_dim: int = 128, query_heads_per_kv_head: int = 1,
                           windows: tuple[int | None, ...] = (None,)) -> SelfCheckResult:
    """The triton backend against the torch one on ``device``: passed with the largest output difference seen, or
    failed with the mismatch or what the kernels raised."""
    try:
        return _compare_backends(torch.device(device), dtype, kv_cache_dtype or dtype, head_dim,
                                 query_heads_per_kv_head, windows)
    except Exception as error:  # Triton missing, compilation or launch
        return SelfCheckResult.failed_by(CHECK_NAME, error)


def _compare_backends(device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype, head_dim: int,
                      query_heads_per_kv_head: int, windows: tuple[int | None, ...]) -> SelfCheckResult:
    num_kv_heads, num_heads = 1, query_heads_per_kv_head
    is_fp8 = kv_cache_dtype == torch.float8_e4m3fn
    generator = torch.Generator().manual_seed(0)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    history = [torch.randn(cache_shape, generator=generator) for _ in range(2)]
    blocks = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(blocks)
    tables = [blocks[0:2], blocks[2:3], blocks[3:22]]
    scales = (0.5, 2.0) if is_fp8 else (1.0, 1.0)
    cases = [  # (new tokens, cached tokens, window)
        case for window in windows for case in (([9, 5, 1], [21, 0, 40], window), ([1, 1, 1], [30, 5, 299], window))
    ]
    worst = 0.0
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    for new_tokens, cached, window in cases:
        layer = _Layer(head_dim ** -0.5, window, *scales)
        batch = ForwardBatch.build([[0] * n for n in new_tokens], cached, tables, BLOCK_SIZE)
        num_tokens = batch.num_tokens
        query = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
        outputs, caches = [], []
        for backend, run_batch in ((torch_backend, batch), (triton_backend, _with_padded_row(batch))):
            padding = run_batch.num_tokens - num_tokens
            key_cache, value_cache = (_to_cache(h, kv_cache_dtype, scale, device) for h, scale in zip(history, scales))
            step_inputs = [_padded(x, padding).to(device, dtype) for x in (query, key, value)]
            metadata = backend.build_metadata(run_batch.to(device), BLOCK_SIZE)
            out = backend.forward(layer, *step_inputs, key_cache, value_cache, metadata)
            if not torch.isfinite(out.float()).all():
                return SelfCheckResult(CHECK_NAME, False, f"{backend.name} attention produced non-finite values")
            outputs.append(out[:num_tokens].float().cpu())
            caches.append([_dequantized(c, s) for c, s in zip((key_cache, value_cache), scales)])
        error = (outputs[0] - outputs[1]).abs().max().item()
        cache_error = max((a - b).abs().max().item() for a, b in zip(*caches))
        allowed = _TOLERANCE.get(dtype, 3e-2) * (4 if is_fp8 else 1)
        if not error <= allowed or cache_error != 0.0:
            return SelfCheckResult(CHECK_NAME, False, f"triton attention differs from torch by {error:.3g} (cache by "
                                   f"{cache_error:.3g}) for new tokens {new_tokens} over {cached} cached, window "
                                   f"{window}", error)
        worst = max(worst, error)
    compute, cache = (str(d).removeprefix("torch.") for d in (dtype, kv_cache_dtype))
    return SelfCheckResult(CHECK_NAME, True, f"{len(cases)} batches in {compute}, {cache} cache, windows {windows}",
                           worst)


def _with_padded_row(batch: ForwardBatch) -> ForwardBatch:
    """The batch plus one padded row the way a CUDA-graph runner pads: slot -1, context 0, table of zeros."""
    width = batch.block_tables.shape[1]
    return ForwardBatch(
        input_ids=torch.cat([batch.input_ids, torch.zeros(1, dtype=torch.int64)]),
        positions=torch.cat([batch.positions, torch.zeros(1, dtype=torch.int64)]),
        query_start_loc=torch.cat([batch.query_start_loc, batch.query_start_loc[-1:] + 1]),
        context_lens=torch.cat([batch.context_lens, torch.zeros(1, dtype=torch.int32)]),
        block_tables=torch.cat([batch.block_tables, torch.zeros(1, width, dtype=torch.int32)]),
        slot_mapping=torch.cat([batch.slot_mapping, torch.full((1,), -1, dtype=torch.int64)]),
        logits_indices=batch.logits_indices,
        query_lens_cpu=batch.query_lens_cpu + [1],
        context_lens_cpu=batch.context_lens_cpu + [0],
    )


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(rows, *x.shape[1:])]) if rows else x


def _to_cache(history: torch.Tensor, dtype: torch.dtype, scale: float, device: torch.device) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        from model.kv_cache import quantize_kv

        return quantize_kv(history, scale).to(device)
    return history.to(device, dtype, copy=True)


def _dequantized(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return cache.float().cpu() * (scale if cache.dtype == torch.float8_e4m3fn else 1.0)
