"""Per-sequence sampling state, built once when a request is admitted: the sampler never rebuilds it per step."""
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
    prompt_seen: torch.Tensor | None  # [V] bool: tokens of the prompt (repetition penalty)
    output_counts: torch.Tensor | None  # [V] float32: occurrences of each output token (penalties)
    generator: torch.Generator | None  # seeded requests only
    vocab_size: int

    @property
    def uses_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def masks_top_k_top_p(self) -> bool:
        return self.top_k < self.vocab_size or self.params.top_p < 1.0


def build_sampling_state(
    params: SamplingParams, prompt_token_ids: list[int], vocab_size: int, eos_token_ids: list[int],
    device: torch.device, generator: torch.Generator | None, prompt_seen: torch.Tensor | None = None,
) -> SamplingState:
    """``prompt_seen`` may be shared by the choices of one request (same prompt)."""
    bias_ids = bias_values = None
    if params.logit_bias:
        bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.int64, device=device)
        bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
    banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    ban = torch.tensor(sorted(banned), dtype=torch.int64, device=device) if params.min_tokens > 0 and banned else None
    repetition = params.repetition_penalty != 1.0
    counts = None
    if repetition or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if repetition and prompt_seen is None:
            prompt_seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt_seen[torch.tensor(prompt_token_ids, dtype=torch.int64, device=device)] = True
    top_k = params.top_k if params.top_k and params.top_k > 0 else vocab_size
    return SamplingState(
        params=params, greedy=params.temperature < GREEDY_TEMPERATURE, top_k=top_k, bias_ids=bias_ids,
        bias_values=bias_values, min_tokens_ban=ban, prompt_seen=prompt_seen if repetition else None,
        output_counts=counts, generator=generator, vocab_size=vocab_size,
    )
