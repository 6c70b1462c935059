"""Per-sequence sampling state, built once when a request is admitted: the sampler never rebuilds it per step.

The parameters the sampler reads on the device live in the sequence's slot of ``SamplingBatch``; this holds the
host-side decisions, the variable-length tensors (logit bias, banned stop ids) and the seeded generator.
"""
from dataclasses import dataclass

import torch

from scheduler.sampling_params import SamplingParams

# Below this, dividing by the temperature can overflow the logits; such a row is treated as greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass(eq=False)
class SamplingState:
    params: SamplingParams  # resolved
    greedy: bool
    top_k: int  # the vocabulary size when disabled
    bias_ids: torch.Tensor | None  # [K] int64 on the device: logit_bias token ids
    bias_values: torch.Tensor | None  # [K] float32
    min_tokens_ban: torch.Tensor | None  # [S] int64: stop and EOS ids, banned until min_tokens outputs exist
    generator: torch.Generator | None  # seeded requests only
    vocab_size: int
    slot: int | None = None  # its rows in SamplingBatch while it is running

    @property
    def uses_penalties(self) -> bool:
        params = self.params
        return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0

    @property
    def masks_top_k_top_p(self) -> bool:
        return self.top_k < self.vocab_size or self.params.top_p < 1.0


def build_sampling_state(
    params: SamplingParams, vocab_size: int, eos_token_ids: list[int], device: torch.device,
    generator: torch.Generator | None,
) -> SamplingState:
    bias_ids = bias_values = None
    if params.logit_bias:
        bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.int64, device=device)
        bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
    banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    ban = torch.tensor(sorted(banned), dtype=torch.int64, device=device) if params.min_tokens > 0 and banned else None
    top_k = params.top_k if params.top_k and params.top_k > 0 else vocab_size
    return SamplingState(
        params=params, greedy=params.temperature < GREEDY_TEMPERATURE, top_k=top_k, bias_ids=bias_ids,
        bias_values=bias_values, min_tokens_ban=ban, generator=generator, vocab_size=vocab_size,
    )
