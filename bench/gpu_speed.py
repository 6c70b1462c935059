"""Speed parts of bench/gpu_check.py: executors built the way the engine builds them, greedy decode and prefill
drivers for them and for Transformers, the card's copy bandwidth, and how many real-size layers fit one card.

Options other helpers add (attention/MoE backends, FP8 weights, FP8 KV cache) are passed only where this checkout's
EngineConfig has them, so the script runs before and after their code merges.
"""
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import torch

from model.config import ModelConfig
from model.forward_batch import ForwardBatch
from scheduler.config import EngineConfig
from scheduler.model_runner import ModelExecutor

BLOCK_SIZE = 16


def supported_options(**wanted: object) -> tuple[dict[str, object], list[str]]:
    """(the options EngineConfig has, the names it lacks)."""
    known = {field.name for field in fields(EngineConfig)}
    return {k: v for k, v in wanted.items() if k in known}, [k for k in wanted if k not in known]


def build_executor(model_dir: Path, device: str, dtype: str, max_model_len: int, max_num_seqs: int,
                   make_graph=None, **options: object) -> ModelExecutor:
    config = EngineConfig(model=str(model_dir), device=device, dtype=dtype, block_size=BLOCK_SIZE,
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                          expert_metrics=False, **options)
    return ModelExecutor(config, make_graph=make_graph)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PagedSequences:
    """``batch`` sequences over interleaved KV blocks, driven like the engine drives the executor: host-built
    batches, prefill in chunks of at most ``max_step_tokens``, one greedy token per decode step read back."""

    def __init__(self, execute, batch: int, max_len: int, num_blocks: int, max_step_tokens: int = 8192) -> None:
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        if blocks_per_seq * batch > num_blocks:
            raise ValueError(f"{batch} sequences of {max_len} tokens need {blocks_per_seq * batch} KV blocks, "
                             f"the cache holds {num_blocks}")
        self.execute = execute
        self.tables = [[block * batch + seq for block in range(blocks_per_seq)] for seq in range(batch)]
        self.max_step_tokens = max_step_tokens
        self.cached = [0] * batch

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        """Prefills every prompt; returns each sequence's first greedy token."""
        tokens: list[int] = []
        per_step = max(1, self.max_step_tokens // len(prompts[0]))
        for first in range(0, len(prompts), per_step):
            seqs = range(first, min(first + per_step, len(prompts)))
            batch = ForwardBatch.build([prompts[s] for s in seqs], [0] * len(seqs), [self.tables[s] for s in seqs],
                                       BLOCK_SIZE)
            tokens += self.execute(batch).argmax(-1).tolist()
            for s in seqs:
                self.cached[s] = len(prompts[s])
        return tokens

    def decode(self, tokens: list[int]) -> list[int]:
        batch = ForwardBatch.build([[t] for t in tokens], self.cached[:len(tokens)], self.tables[:len(tokens)],
                                   BLOCK_SIZE)
        next_tokens = self.execute(batch).argmax(-1).tolist()
        self.cached = [c + 1 for c in self.cached]
        return next_tokens

    def decode_step_seconds(self, tokens: list[int], steps: int, warmup: int = 3) -> float:
        """Median seconds of a decode step (host batch building, forward, argmax and the read-back included)."""
        for _ in range(warmup):
            tokens = self.decode(tokens)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            tokens = self.decode(tokens)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def our_decode_step(executor: ModelExecutor, batch: int, prompt_len: int, steps: int, vocab: int,
                    seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
    sequences = PagedSequences(executor.execute, batch, prompt_len + steps + 8, executor.num_kv_blocks)
    return sequences.decode_step_seconds(sequences.prefill(prompts), steps)


@torch.no_grad()
def transformers_decode_step(reference, batch: int, prompt_len: int, steps: int, vocab: int, device: str,
                             seed: int = 0) -> float:
    from transformers.cache_utils import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    cache = DynamicCache(config=reference.config)
    out = reference(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        tokens = reference(input_ids=tokens, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        tokens.tolist()  # the engine reads sampled tokens on the host every step; so does this loop
        if step >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_seconds(executor: ModelExecutor, prompt_len: int, num_prompts: int, vocab: int, rounds: int = 3) -> float:
    """Median seconds of one forward over ``num_prompts`` fresh prompts of ``prompt_len`` (after one warm-up)."""
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, vocab, (num_prompts, prompt_len), generator=generator).tolist()
    times = []
    for _ in range(rounds + 1):
        sequences = PagedSequences(executor.execute, num_prompts, prompt_len, executor.num_kv_blocks,
                                   prompt_len * num_prompts)
        synchronize(executor.device)
        start = time.perf_counter()
        sequences.prefill(prompts)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def copy_bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of five over 1 GiB."""
    size = (1 << 30) if torch.device(device).type == "cuda" else (64 << 20)
    source = torch.ones(size // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        destination.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def expected_experts_touched(config: ModelConfig, batch: int) -> float:
    """Distinct routed experts one MoE layer reads at ``batch`` tokens, for independent uniform top-k routing."""
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    return experts * (1 - (1 - top_k / experts) ** batch)


def decode_weight_bytes(executor: ModelExecutor, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` tokens reads: every weight but the embedding table, with the
    routed experts counted for the distinct experts the batch is expected to touch."""
    config = executor.model_config
    routed_bytes, other_bytes = 0, 0
    for name, param in executor.model.named_parameters():
        size = param.numel() * param.element_size()
        if name.startswith("embed_tokens"):
            continue
        if ".experts." in name:
            routed_bytes += size
        else:
            other_bytes += size
    per_expert_share = expected_experts_touched(config, batch) / config.n_routed_experts
    return other_bytes + routed_bytes * per_expert_share


def write_sliced_config(source: Path, model_dir: Path, num_layers: int, **overrides: object) -> None:
    """config.json of ``source`` with ``num_layers`` layers (dummy weights need no more)."""
    config = json.loads((source / "config.json").read_text())
    config.update(num_hidden_layers=num_layers, **overrides)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))


def layers_that_fit(config_dir: Path, dtype_bytes: int, free_bytes: int, reserve_bytes: int) -> int:
    """Layers of the config (the first dense, the rest MoE) whose weights fit ``free_bytes - reserve_bytes``."""
    config = json.loads((config_dir / "config.json").read_text())
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config["head_dim"]
    kv_heads = config["num_key_value_heads"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = config["n_routed_experts"] + config["n_shared_experts"]
    moe_layer = attention + 3 * hidden * config["moe_intermediate_size"] * experts + hidden * config["n_routed_experts"]
    dense_layer = attention + 3 * hidden * config["intermediate_size"]
    embeddings = 2 * config["vocab_size"] * hidden
    room = (free_bytes - reserve_bytes) // dtype_bytes - embeddings - dense_layer
    return max(1, min(config["num_hidden_layers"], 1 + room // moe_layer))
