"""Picks the next token of every sequence in the batch at once, each with its own sampling parameters.

Order of operations on the logits: logit_bias, min_tokens bans, penalties; then greedy rows take the argmax and the
other rows go through temperature, top-k, top-p, min-p and an exponential race (argmax of p / Exp(1) noise, which
draws token i with probability p_i). Seeded rows draw their noise from their own generator, so a seeded request gets
the same tokens whatever else is in the batch. Logprobs always come from the raw model logits.
"""
from dataclasses import dataclass

import torch

from scheduler.outputs import TokenLogprob
from scheduler.sequence import Sequence

# Below this, dividing by the temperature can overflow the logits; such a row is treated as greedy.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row; None where logprobs were not requested


class Sampler:
    def __init__(self, eos_token_ids: list[int], generator: torch.Generator | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator  # noise for unseeded rows

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits``: [B, V] float32 raw model logits, row i for ``seqs[i]``."""
        num_rows, vocab_size = logits.shape
        device = logits.device
        raw_logits = logits
        logits = logits.clone()
        self._apply_logit_bias(logits, seqs)
        self._ban_stop_tokens_before_min_tokens(logits, seqs)
        self._apply_penalties(logits, seqs)

        temperatures = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        greedy = temperatures < GREEDY_TEMPERATURE  # [B] on CPU
        token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
        if bool(greedy.any()):
            rows = greedy.nonzero().squeeze(1).to(device)
            token_ids[rows] = logits[rows].argmax(dim=-1)
        if not bool(greedy.all()):
            rows_cpu = (~greedy).nonzero().squeeze(1)
            rows = rows_cpu.to(device)
            sampled_seqs = [seqs[i] for i in rows_cpu.tolist()]
            scaled = logits[rows] / temperatures[rows_cpu].to(device).unsqueeze(1)  # [R, V]
            scaled = _mask_top_k_top_p(scaled, sampled_seqs)
            probs = torch.softmax(scaled, dim=-1)  # [R, V]
            min_p = torch.tensor([s.params.min_p for s in sampled_seqs], dtype=torch.float32, device=device)
            if bool((min_p > 0).any()):
                max_probs = probs.max(dim=-1, keepdim=True).values
                probs = probs.masked_fill(probs < min_p.unsqueeze(1) * max_probs, 0.0)
            noise = self._exponential_noise(sampled_seqs, vocab_size, device)  # [R, V]
            token_ids[rows] = (probs / noise).argmax(dim=-1)

        token_list = token_ids.tolist()
        return SamplerOutput(token_list, _token_logprobs(raw_logits, token_list, seqs))

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, cols, values = [], [], []
        for row, seq in enumerate(seqs):
            for token_id, bias in seq.params.logit_bias.items():
                rows.append(row)
                cols.append(token_id)
                values.append(bias)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)

    def _ban_stop_tokens_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, cols = [], []
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens >= seq.params.min_tokens:
                continue
            banned = set(seq.params.stop_token_ids)
            if not seq.params.ignore_eos:
                banned.update(self.eos_token_ids)
            rows.extend([row] * len(banned))
            cols.extend(banned)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        device = logits.device
        repetition = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=torch.float32, device=device)
        presence = torch.tensor([s.params.presence_penalty for s in seqs], dtype=torch.float32, device=device)
        frequency = torch.tensor([s.params.frequency_penalty for s in seqs], dtype=torch.float32, device=device)
        use_repetition = any(s.params.repetition_penalty != 1.0 for s in seqs)
        use_counts = any(s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0 for s in seqs)
        if use_repetition:
            seen = _token_counts(logits.shape, [s.token_ids for s in seqs], device) > 0  # [B, V]
            penalty = repetition.unsqueeze(1)
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, penalized, logits))
        if use_counts:
            counts = _token_counts(logits.shape, [s.output_token_ids for s in seqs], device)  # [B, V]
            logits -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0).float()

    def _exponential_noise(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> torch.Tensor:
        noise = torch.empty(len(seqs), vocab_size, dtype=torch.float32, device=device)
        unseeded = [row for row, seq in enumerate(seqs) if seq.generator is None]
        if unseeded:
            rows = torch.tensor(unseeded, device=device)
            draw = torch.empty(len(unseeded), vocab_size, dtype=torch.float32, device=device)
            noise[rows] = draw.exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        return noise


def _token_counts(shape: torch.Size, token_lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, V] float32: how often each token occurs in each row's list."""
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    rows = [row for row, tokens in enumerate(token_lists) for _ in tokens]
    cols = [token for tokens in token_lists for token in tokens]
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        counts.index_put_(index, torch.ones(len(rows), device=device), accumulate=True)
    return counts


def _mask_top_k_top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Sets to -inf what top-k (k <= 0 disables) and top-p (1.0 disables) exclude, per row. ``logits``: [R, V]."""
    num_rows, vocab_size = logits.shape
    top_k = [s.params.top_k if s.params.top_k and s.params.top_k > 0 else vocab_size for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if all(k >= vocab_size for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending: [R, V]
    # top-k: keep values >= the k-th largest.
    kth_index = torch.tensor([vocab_size - k for k in top_k], device=logits.device).unsqueeze(1)
    kth_value = sorted_logits.gather(1, kth_index)  # [R, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    # top-p: drop the low tail whose total probability is at most 1 - top_p; the most likely token always stays.
    probs = torch.softmax(sorted_logits, dim=-1)
    tail_mass = probs.cumsum(dim=-1)
    top_p_tensor = torch.tensor(top_p, dtype=torch.float32, device=logits.device).unsqueeze(1)
    drop = tail_mass <= 1.0 - top_p_tensor
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _token_logprobs(raw_logits: torch.Tensor, token_ids: list[int], seqs: list[Sequence]) -> list[TokenLogprob | None]:
    rows = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(seqs)
    if not rows:
        return results
    device = raw_logits.device
    chosen = torch.tensor([token_ids[row] for row in rows], device=device)
    top_ks = [seqs[row].params.logprobs for row in rows]
    for row, logprob in zip(rows, logprobs_with_top(raw_logits[torch.tensor(rows, device=device)], chosen, top_ks)):
        results[row] = logprob
    return results


def logprobs_with_top(raw_logits: torch.Tensor, token_ids: torch.Tensor, top_ks: list[int]) -> list[TokenLogprob]:
    """Log-softmax of ``raw_logits`` [N, V]: each row's ``token_ids`` entry and its ``top_ks`` most likely tokens."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    max_k = max(top_ks, default=0)
    top_values: list[list[float]] = [[] for _ in top_ks]
    top_ids: list[list[int]] = [[] for _ in top_ks]
    if max_k > 0:
        values, ids = logprobs.topk(max_k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(token_id, logprob, list(zip(ids[:k], values[:k])))
        for token_id, logprob, ids, values, k in zip(token_ids.tolist(), chosen, top_ids, top_values, top_ks)
    ]
