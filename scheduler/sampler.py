"""Picks the next token of every sequence in the batch at once, each with its own sampling parameters.

Order of operations on the logits: logit_bias, min_tokens bans, penalties; then greedy rows take the argmax and the
other rows go through temperature, top-k, top-p, min-p and an exponential race (argmax of p / Exp(1) noise, which
draws token i with probability p_i). Seeded rows draw their noise from their own generator, so a seeded request gets
the same tokens whatever else is in the batch. Logprobs come from the logits as handed in: the model's, after
any grammar mask, before bias, bans and penalties.

Every per-request tensor (bias, bans, penalty counts, generator) lives on the sequence's ``SamplingState``, built at
admission. Decisions use host-side parameters only: the one device-to-host copy is the sampled tokens (and one more
for the logprobs, when asked).
"""
from dataclasses import dataclass

import torch

from scheduler.outputs import TokenLogprob
from scheduler.sampling_state import SamplingState
from scheduler.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row; None where logprobs were not requested


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # noise for unseeded rows

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits``: [B, V] float32 raw model logits, row i for ``seqs[i]`` (whose ``sampling`` is set)."""
        states = [seq.sampling for seq in seqs]
        device = logits.device
        raw_logits = logits
        if any(s.bias_ids is not None or s.min_tokens_ban is not None or s.uses_penalties for s in states):
            logits = logits.clone()  # the raw logits stay for the logprobs
        _apply_logit_bias(logits, states)
        _ban_stop_tokens_before_min_tokens(logits, seqs)
        _apply_penalties(logits, states)

        greedy_rows = [row for row, state in enumerate(states) if state.greedy]
        sampled_rows = [row for row, state in enumerate(states) if not state.greedy]
        if not sampled_rows:
            token_ids = logits.argmax(dim=-1)  # [B]
        else:
            token_ids = torch.empty(len(seqs), dtype=torch.int64, device=device)
            if greedy_rows:
                rows = _index(greedy_rows, device)
                token_ids[rows] = logits[rows].argmax(dim=-1)
            token_ids[_index(sampled_rows, device)] = self._draw(logits, [states[row] for row in sampled_rows], sampled_rows)
        _count_outputs(states, token_ids)
        token_list = token_ids.tolist()
        return SamplerOutput(token_list, _token_logprobs(raw_logits, token_ids, token_list, states))

    def _draw(self, logits: torch.Tensor, states: list[SamplingState], rows: list[int]) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([s.params.temperature for s in states], dtype=torch.float32, device=device)
        scaled = logits[_index(rows, device)] / temperatures.unsqueeze(1)  # [R, V]
        if any(s.masks_top_k_top_p for s in states):
            scaled = _mask_top_k_top_p(scaled, states)
        probs = torch.softmax(scaled, dim=-1)  # [R, V]
        if any(s.params.min_p > 0 for s in states):
            min_p = torch.tensor([s.params.min_p for s in states], dtype=torch.float32, device=device)
            max_probs = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * max_probs, 0.0)
        return (probs / self._exponential_noise(states, probs.shape[1], device)).argmax(dim=-1)

    def _exponential_noise(self, states: list[SamplingState], vocab_size: int, device: torch.device) -> torch.Tensor:
        noise = torch.empty(len(states), vocab_size, dtype=torch.float32, device=device)
        unseeded = [row for row, state in enumerate(states) if state.generator is None]
        if len(unseeded) == len(states):
            return noise.exponential_(generator=self.generator)
        if unseeded:
            draw = torch.empty(len(unseeded), vocab_size, dtype=torch.float32, device=device)
            noise[_index(unseeded, device)] = draw.exponential_(generator=self.generator)
        for row, state in enumerate(states):
            if state.generator is not None:
                noise[row].exponential_(generator=state.generator)
        return noise


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _apply_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    biased = [(row, state) for row, state in enumerate(states) if state.bias_ids is not None]
    if not biased:
        return
    rows = torch.cat([torch.full_like(s.bias_ids, row) for row, s in biased])
    cols = torch.cat([s.bias_ids for _, s in biased])
    logits.index_put_((rows, cols), torch.cat([s.bias_values for _, s in biased]), accumulate=True)


def _ban_stop_tokens_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    banned = [(row, seq.sampling.min_tokens_ban) for row, seq in enumerate(seqs)
              if seq.sampling.min_tokens_ban is not None and seq.num_output_tokens < seq.params.min_tokens]
    if not banned:
        return
    rows = torch.cat([torch.full_like(ban, row) for row, ban in banned])
    cols = torch.cat([ban for _, ban in banned])
    logits.index_put_((rows, cols), torch.tensor(float("-inf"), device=logits.device))


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    penalized = [row for row, state in enumerate(states) if state.uses_penalties]
    if not penalized:
        return
    device = logits.device
    rows = _index(penalized, device)
    chosen = [states[row] for row in penalized]
    counts = torch.stack([s.output_counts for s in chosen])  # [P, V]
    values = logits[rows]  # [P, V]
    if any(s.params.repetition_penalty != 1.0 for s in chosen):
        seen = counts > 0
        for i, state in enumerate(chosen):
            if state.prompt_seen is not None:
                seen[i] |= state.prompt_seen
        penalty = torch.tensor([s.params.repetition_penalty for s in chosen], dtype=torch.float32, device=device)
        penalty = penalty.unsqueeze(1)
        values = torch.where(seen, torch.where(values > 0, values / penalty, values * penalty), values)
    frequency = torch.tensor([s.params.frequency_penalty for s in chosen], dtype=torch.float32, device=device)
    presence = torch.tensor([s.params.presence_penalty for s in chosen], dtype=torch.float32, device=device)
    values = values - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).float()
    logits[rows] = values


def _count_outputs(states: list[SamplingState], token_ids: torch.Tensor) -> None:
    """Adds each sampled token to its row's output counts, on the device (no sync)."""
    counted = [row for row, state in enumerate(states) if state.output_counts is not None]
    if not counted:
        return
    one = torch.ones(1, dtype=torch.float32, device=token_ids.device)
    for row in counted:
        states[row].output_counts.index_add_(0, token_ids[row : row + 1], one)


def _mask_top_k_top_p(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Sets to -inf what top-k and top-p (1.0 disables) exclude, per row. ``logits``: [R, V]."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: [R, V]
    # top-k: keep values >= the k-th largest.
    kth_index = torch.tensor([vocab_size - min(s.top_k, vocab_size) for s in states], device=logits.device).unsqueeze(1)
    kth_value = sorted_logits.gather(1, kth_index)  # [R, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    # top-p: drop the low tail whose total probability is at most 1 - top_p; the most likely token always stays.
    probs = torch.softmax(sorted_logits, dim=-1)
    tail_mass = probs.cumsum(dim=-1)
    top_p = torch.tensor([s.params.top_p for s in states], dtype=torch.float32, device=logits.device).unsqueeze(1)
    drop = tail_mass <= 1.0 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _token_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, token_list: list[int], states: list[SamplingState]
) -> list[TokenLogprob | None]:
    rows = [row for row, state in enumerate(states) if state.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(states)
    if not rows:
        return results
    index = _index(rows, raw_logits.device)
    top_ks = [states[row].params.logprobs for row in rows]
    chosen = [token_list[row] for row in rows]
    for row, logprob in zip(rows, logprobs_with_top(raw_logits[index], chosen, top_ks)):
        results[row] = logprob
    return results


def logprobs_with_top(raw_logits: torch.Tensor, token_ids: list[int], top_ks: list[int]) -> list[TokenLogprob]:
    """Log-softmax of ``raw_logits`` [N, V]: each row's ``token_ids`` entry and its ``top_ks`` most likely tokens.

    One device-to-host copy: the chosen logprobs, the top values and the top ids (exact in float64) packed together.
    """
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)  # [N, V]
    targets = torch.tensor(token_ids, dtype=torch.int64, device=raw_logits.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [N, 1]
    max_k = max(top_ks, default=0)
    parts = [chosen.double()]
    if max_k > 0:
        values, ids = logprobs.topk(max_k, dim=-1)  # [N, K]
        parts += [values.double(), ids.double()]
    packed = torch.cat(parts, dim=1).tolist()  # [N, 1 + 2K]
    entries = []
    for token_id, row, k in zip(token_ids, packed, top_ks):
        top = [(int(row[1 + max_k + j]), row[1 + j]) for j in range(k)]
        entries.append(TokenLogprob(token_id, row[0], top))
    return entries
