"""Picks the next token of every sequence in the batch at once, each with its own sampling parameters.

Order of operations on the logits: logit_bias, min_tokens bans, penalties; then greedy rows take the argmax and the
other rows go through temperature, top-k, top-p, min-p and an exponential race (argmax of p / Exp(1) noise, which
draws token i with probability p_i). Seeded rows draw their noise from their own generator, so a seeded request gets
the same tokens whatever else is in the batch. Logprobs come from the logits as handed in: the model's, after
any grammar mask, before bias, bans and penalties.

Per-request parameters and penalty counts live in ``SamplingBatch`` slots, written when a sequence first samples
(and again after a preemption); a step gathers its rows by slot index. Host-to-device traffic per step is the one
copy of those indices (none for an all-greedy batch without penalties); device-to-host, the sampled tokens (and the
logprobs, when asked).
"""
from dataclasses import dataclass

import torch

from scheduler.outputs import TokenLogprob
from scheduler.sampler_inputs import SamplerInputs
from scheduler.sampling_batch import SamplingBatch
from scheduler.sampling_state import SamplingState
from scheduler.sequence import Sequence

TOP_P_CANDIDATES = 64  # tokens top-p looks among before it sorts a whole row


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row; None where logprobs were not requested


class Sampler:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device,
                 generator: torch.Generator | None = None) -> None:
        self.generator = generator  # noise for unseeded rows
        self.batch = SamplingBatch(max_num_seqs, vocab_size, device)
        self.inputs = SamplerInputs(max_num_seqs, device)

    def release(self, seq: Sequence) -> None:
        """``seq`` finished or was preempted: its slot is free (it rejoins, counts rebuilt, if it samples again)."""
        if seq.sampling is not None:
            self.batch.leave(seq.sampling)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """``logits``: [B, V] float32 raw model logits, row i for ``seqs[i]`` (whose ``sampling`` is set)."""
        states = [seq.sampling for seq in seqs]
        for seq, state in zip(seqs, states):
            if state.slot is None:
                self.batch.join(state, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids)
        sampled_rows = [row for row, state in enumerate(states) if not state.greedy]
        penalized = any(state.uses_penalties for state in states)
        slots = draw_rows = None
        if sampled_rows or penalized:
            slots, draw_rows = self.inputs.load([state.slot for state in states], sampled_rows)
        raw_logits = logits
        if penalized or any(s.bias_ids is not None or s.min_tokens_ban is not None for s in states):
            logits = logits.clone()  # the raw logits stay for the logprobs
        _apply_logit_bias(logits, states)
        _ban_stop_tokens_before_min_tokens(logits, seqs)
        if penalized:
            logits = self._apply_penalties(logits, slots, states)

        if not sampled_rows:
            token_ids = logits.argmax(dim=-1)  # [B]
        elif len(sampled_rows) == len(states):
            token_ids = self._draw(logits, slots, states)
        else:
            token_ids = logits.argmax(dim=-1)
            token_ids[draw_rows] = self._draw(logits[draw_rows], slots[draw_rows], [states[r] for r in sampled_rows])
        if penalized:  # counts every row's token; rows without penalties never read theirs
            self.batch.output_counts.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.float32),
                                                accumulate=True)
        token_list = token_ids.tolist()
        return SamplerOutput(token_list, _token_logprobs(raw_logits, token_list, states))

    def _apply_penalties(self, logits: torch.Tensor, slots: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Every row at once: rows without penalties have the neutral values (1, 0, 0), which change nothing."""
        batch = self.batch
        counts = batch.output_counts[slots]  # [B, V]
        if any(state.params.repetition_penalty != 1.0 for state in states):
            seen = (counts > 0) | batch.prompt_seen[slots]
            penalty = batch.repetition_penalty[slots].unsqueeze(1)
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        frequency = batch.frequency_penalty[slots].unsqueeze(1)
        presence = batch.presence_penalty[slots].unsqueeze(1)
        return logits - frequency * counts - presence * (counts > 0).float()

    def _draw(self, logits: torch.Tensor, slots: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """``logits`` [R, V] of rows that draw at random, ``slots`` [R] their slots."""
        batch = self.batch
        scaled = logits / batch.temperature[slots].unsqueeze(1)  # [R, V]
        if any(s.masks_top_k_top_p for s in states):
            max_top_k = max((s.top_k for s in states if s.top_k < s.vocab_size), default=0)
            scaled = _mask_top_k_top_p(scaled, batch.top_k[slots], batch.top_p[slots], max_top_k)
        probs = torch.softmax(scaled, dim=-1)  # [R, V]
        if any(s.params.min_p > 0 for s in states):
            max_probs = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < batch.min_p[slots].unsqueeze(1) * max_probs, 0.0)
        return (probs / self._exponential_noise(states, probs.shape[1], probs.device)).argmax(dim=-1)

    def _exponential_noise(self, states: list[SamplingState], vocab_size: int, device: torch.device) -> torch.Tensor:
        noise = torch.empty(len(states), vocab_size, dtype=torch.float32, device=device)
        if any(state.generator is None for state in states):
            noise.exponential_(generator=self.generator)
        for row, state in enumerate(states):
            if state.generator is not None:  # its own draws only: the same tokens whatever the batch
                noise[row].exponential_(generator=state.generator)
        return noise


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
    logits[rows, cols] = float("-inf")  # a scalar: no tensor copied to the device


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Sets to -inf what top-k and top-p (1.0 disables) exclude, per row. ``logits``: [R, V]; ``top_k`` [R] int64
    (the vocabulary size disables it), ``top_p`` [R] float32; ``max_top_k``: the largest top-k asked (0: none).

    Looks among the C most likely tokens of each row (C = the largest top-k, at least ``TOP_P_CANDIDATES``) instead
    of sorting whole rows; only rows whose top-p nucleus holds more than C tokens are sorted."""
    vocab_size = logits.shape[1]
    num_candidates = max(max_top_k, TOP_P_CANDIDATES)
    if num_candidates >= vocab_size:
        return _mask_top_k_top_p_by_sorting(logits, top_k, top_p)
    values = logits.topk(num_candidates, dim=-1).values  # descending: [R, C]
    ranks = torch.arange(num_candidates, device=logits.device)
    in_top_k = ranks.unsqueeze(0) < top_k.unsqueeze(1)  # [R, C]
    has_top_k = top_k < vocab_size
    candidates = values.masked_fill(~in_top_k, float("-inf"))
    # Top-p weighs the tokens top-k left: a top-k row's candidates, or the whole row.
    normaliser = torch.where(has_top_k, torch.logsumexp(candidates, dim=-1), torch.logsumexp(logits, dim=-1))
    probs = torch.exp(candidates - normaliser.unsqueeze(1))  # [R, C]
    ahead = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
    top_p = top_p.unsqueeze(1)
    keep = in_top_k & ((ahead < top_p) | (top_p >= 1.0))
    keep[:, 0] = True  # the most likely token always stays
    threshold = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)  # [R, 1]: the least likely kept value
    untouched = ~has_top_k & (top_p.squeeze(1) >= 1.0)
    threshold = threshold.masked_fill(untouched.unsqueeze(1), float("-inf"))
    masked = logits.masked_fill(logits < threshold, float("-inf"))
    nucleus_beyond = ~has_top_k & ~untouched & (probs.sum(dim=-1) < top_p.squeeze(1))
    if bool(nucleus_beyond.any()):  # a flat distribution: those rows are sorted whole
        rows = nucleus_beyond.nonzero().squeeze(1)
        masked[rows] = _mask_top_k_top_p_by_sorting(logits[rows], top_k[rows], top_p.squeeze(1)[rows])
    return masked


def _mask_top_k_top_p_by_sorting(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``_mask_top_k_top_p`` by sorting every row whole."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: [R, V]
    # top-k: keep values >= the k-th largest.
    kth_index = (vocab_size - top_k.clamp(max=vocab_size)).unsqueeze(1)
    kth_value = sorted_logits.gather(1, kth_index)  # [R, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    # top-p: drop the low tail whose total probability is at most 1 - top_p; the most likely token always stays.
    probs = torch.softmax(sorted_logits, dim=-1)
    tail_mass = probs.cumsum(dim=-1)
    drop = tail_mass <= 1.0 - top_p.unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _token_logprobs(
    raw_logits: torch.Tensor, token_list: list[int], states: list[SamplingState]
) -> list[TokenLogprob | None]:
    rows = [row for row, state in enumerate(states) if state.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(states)
    if not rows:
        return results
    if len(rows) < len(states):  # some rows only: one more small copy, for requests that asked for logprobs
        raw_logits = raw_logits[torch.tensor(rows, dtype=torch.int64, device=raw_logits.device)]
    top_ks = [states[row].params.logprobs for row in rows]
    chosen = [token_list[row] for row in rows]
    for row, logprob in zip(rows, logprobs_with_top(raw_logits, chosen, top_ks)):
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
