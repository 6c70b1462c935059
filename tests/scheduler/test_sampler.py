"""Batched sampling: greedy, filters, penalties, bias, min_tokens, seeds, logprobs."""
import math

import pytest
import torch

from sched_helpers import make_seq
from scheduler.sampler import Sampler as BatchSampler
from scheduler.sampler import _mask_top_k_top_p, _mask_top_k_top_p_by_sorting
from scheduler.sampling_state import build_sampling_state

EOS = 9
VOCAB = 10


class PendingSeq:
    """A sequence whose sampling state is built, as at admission, once the vocabulary (logits width) is known."""

    def __init__(self, output: list[int], prompt: list[int], seed: int | None, params: dict) -> None:
        self.seq = make_seq(prompt, **params)
        self.output = output
        self.seed = seed

    def admit(self, vocab_size: int):
        seq = self.seq
        if seq.sampling is None:
            generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
            seq.sampling = build_sampling_state(seq.params, vocab_size, [EOS], torch.device("cpu"), generator)
            seq.token_ids.extend(self.output)  # outputs so far: the sampler counts them when the sequence joins
        return seq


class Sampler:
    """The engine's sampler, sized for the largest batch so far (its vocabulary is the logits' width). Sequences
    leave their slots after every batch, as if preempted: they rejoin with counts rebuilt from their tokens."""

    def __init__(self, eos_token_ids: list[int], generator: torch.Generator | None = None) -> None:
        assert eos_token_ids == [EOS]
        self.generator = generator
        self.sampler: BatchSampler | None = None

    def sample(self, logits: torch.Tensor, pending: list[PendingSeq]):
        if self.sampler is None or self.sampler.batch.max_num_seqs < len(pending):
            self.sampler = BatchSampler(len(pending), logits.shape[1], logits.device, self.generator)
        seqs = [s.admit(logits.shape[1]) for s in pending]
        try:
            return self.sampler.sample(logits, seqs)
        finally:
            for seq in seqs:
                self.sampler.release(seq)


def seq_with(output: list[int] | None = None, prompt: list[int] | None = None, seed: int | None = None, **params: object):
    return PendingSeq(output or [], prompt or [5], seed, params)


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)  # [1, V]


def sample_many(logits_row: torch.Tensor, rows: int, **params: object) -> torch.Tensor:
    sampler = Sampler([EOS], torch.Generator().manual_seed(0))
    seqs = [seq_with(**params) for _ in range(rows)]
    return torch.tensor(sampler.sample(logits_row.expand(rows, -1).clone(), seqs).token_ids)


def test_greedy_takes_each_rows_argmax() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))
    seqs = [seq_with(temperature=0.0) for _ in range(5)]
    out = Sampler([EOS]).sample(logits, seqs)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 5


def test_plain_sampling_follows_the_softmax() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    tokens = sample_many(logits_from_probs(probs), 20000, temperature=1.0)
    freqs = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freqs, torch.tensor(probs), atol=0.015)


def test_temperature_sharpens() -> None:
    tokens = sample_many(logits_from_probs([0.4, 0.3, 0.2, 0.1]), 4000, temperature=0.25)
    freqs = torch.bincount(tokens, minlength=4).float() / 4000
    expected = torch.tensor([0.4, 0.3, 0.2, 0.1]) ** 4
    assert torch.allclose(freqs, expected / expected.sum(), atol=0.03)


def test_top_k_keeps_exactly_the_k_most_likely() -> None:
    tokens = sample_many(logits_from_probs([0.1, 0.25, 0.05, 0.3, 0.2, 0.1]), 4000, temperature=1.0, top_k=3)
    assert set(tokens.tolist()) == {1, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    tokens = sample_many(logits_from_probs([0.15, 0.5, 0.05, 0.3]), 4000, temperature=1.0, top_p=0.75)
    assert set(tokens.tolist()) == {1, 3}
    only_top = sample_many(logits_from_probs([0.15, 0.5, 0.05, 0.3]), 500, temperature=1.0, top_p=0.01)
    assert set(only_top.tolist()) == {1}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    tokens = sample_many(logits_from_probs([0.5, 0.3, 0.15, 0.05]), 4000, temperature=1.0, min_p=0.2)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_filters_are_per_row_in_one_batch() -> None:
    logits = logits_from_probs([0.1, 0.25, 0.05, 0.3, 0.2, 0.1]).expand(3000, -1).clone()
    seqs = [seq_with(temperature=1.0, top_k=1 if i % 2 else 0) for i in range(3000)]
    tokens = Sampler([EOS], torch.Generator().manual_seed(0)).sample(logits, seqs).token_ids
    assert {t for i, t in enumerate(tokens) if i % 2} == {3}
    assert len({t for i, t in enumerate(tokens) if i % 2 == 0}) == 6


def test_presence_and_frequency_penalties_use_output_counts() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    sampler = Sampler([EOS])
    assert sampler.sample(logits, [seq_with([0], temperature=0.0)]).token_ids == [0]
    assert sampler.sample(logits, [seq_with([0], temperature=0.0, presence_penalty=1.0)]).token_ids == [1]
    # Frequency scales with the count: once costs 0.4 (still ahead), twice 0.8 (behind).
    assert sampler.sample(logits, [seq_with([0], temperature=0.0, frequency_penalty=0.4)]).token_ids == [0]
    assert sampler.sample(logits, [seq_with([0, 0], temperature=0.0, frequency_penalty=0.4)]).token_ids == [1]
    # Prompt tokens do not count for presence/frequency.
    assert sampler.sample(logits, [seq_with([], prompt=[0], temperature=0.0, presence_penalty=1.0)]).token_ids == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    sampler = Sampler([EOS])
    positive = torch.tensor([[2.0, 1.5, -5.0]])
    assert sampler.sample(positive, [seq_with(prompt=[0], temperature=0.0, repetition_penalty=1.5)]).token_ids == [1]
    negative = torch.tensor([[-1.0, -1.2, -5.0]])
    assert sampler.sample(negative, [seq_with(prompt=[0], temperature=0.0, repetition_penalty=1.5)]).token_ids == [1]
    assert sampler.sample(negative, [seq_with(prompt=[2], temperature=0.0, repetition_penalty=1.5)]).token_ids == [0]


def test_logit_bias_moves_a_token() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    out = Sampler([EOS]).sample(logits, [seq_with(temperature=0.0, logit_bias={2: 6.0})])
    assert out.token_ids == [2]
    sampled = sample_many(torch.tensor([[5.0, 0.0, 0.0]]), 500, temperature=1.0, logit_bias={0: -100.0})
    assert 0 not in sampled.tolist()


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 3] = 9.0
    logits[0, 1] = 8.0
    sampler = Sampler([EOS])
    early = seq_with([4], temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert sampler.sample(logits, [early]).token_ids == [1]
    reached = seq_with([4, 4, 4], temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert sampler.sample(logits, [reached]).token_ids == [EOS]
    ignoring_eos = seq_with([4], temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sampler.sample(logits, [ignoring_eos]).token_ids == [EOS]


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(1, 50, generator=gen) for _ in range(6)]

    def run(batch_size: int, row: int, global_seed: int) -> list[int]:
        sampler = Sampler([EOS], torch.Generator().manual_seed(global_seed))
        seeded = seq_with(temperature=1.0, top_p=0.9, seed=42)
        others = [seq_with(temperature=0.8, seed=7 if i % 2 else None) for i in range(batch_size - 1)]
        batch = others[:row] + [seeded] + others[row:]
        tokens = []
        for logits in steps:
            noise = torch.randn(batch_size, 50, generator=gen)
            rows = torch.cat([noise[:row], logits, noise[row + 1 :]]) if batch_size > 1 else logits
            tokens.append(sampler.sample(rows, batch).token_ids[row])
        return tokens

    alone = run(1, 0, 0)
    assert run(5, 3, 1) == alone
    assert run(9, 0, 2) == alone
    assert len(set(alone)) > 1


def test_logprobs_come_from_raw_logits_and_include_a_sampled_token_outside_the_top() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    expected = torch.log_softmax(logits, dim=-1)[0]
    seq = seq_with(temperature=0.5, logprobs=2, logit_bias={4: 100.0}, presence_penalty=2.0)
    out = Sampler([EOS]).sample(logits, [seq])
    assert out.token_ids == [4]
    logprob = out.logprobs[0]
    assert logprob.token_id == 4
    assert math.isclose(logprob.logprob, expected[4].item(), rel_tol=1e-6)
    assert [t for t, _ in logprob.top] == [0, 1]
    assert [v for _, v in logprob.top] == pytest.approx(expected[:2].tolist(), rel=1e-6)


def test_logprobs_zero_gives_only_the_sampled_token() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = Sampler([EOS]).sample(logits, [seq_with(temperature=0.0, logprobs=0)])
    assert out.logprobs[0].token_id == 2 and out.logprobs[0].top == []


def test_penalty_counts_follow_the_sampled_tokens_across_steps() -> None:
    sampler = Sampler([EOS])
    pending = seq_with([], temperature=0.0, presence_penalty=2.0)
    logits = torch.tensor([[3.0, 2.0, 0.5, 0.0]])
    first = sampler.sample(logits, [pending]).token_ids  # the sampler counts token 0 itself
    pending.seq.token_ids.extend(first)
    assert first == [0] and sampler.sample(logits, [pending]).token_ids == [1]


def test_a_reused_slot_starts_clean_and_a_rejoining_sequence_gets_its_counts_back() -> None:
    sampler = BatchSampler(1, 4, torch.device("cpu"))
    logits = torch.tensor([[3.0, 2.0, 1.8, 0.0]])
    penalised = seq_with([0, 0], prompt=[1], temperature=0.0, frequency_penalty=1.0, repetition_penalty=2.0)
    first = penalised.admit(4)
    assert sampler.sample(logits, [first]).token_ids == [2]  # 0: 3 / 2 - 2 = -0.5; 1 (prompt): 2 / 2; 2: 1.8
    sampler.release(first)
    assert sampler.batch.num_free_slots == 1
    plain = seq_with([], prompt=[3], temperature=0.0, frequency_penalty=2.0, repetition_penalty=4.0).admit(4)
    assert sampler.sample(logits, [plain]).token_ids == [0]  # nothing of the previous occupant's counts or prompt
    sampler.release(plain)
    first.token_ids.append(2)
    assert sampler.sample(logits, [first]).token_ids == [1]  # counts rebuilt from its outputs: 0 twice, 2 once
    with pytest.raises(RuntimeError, match="sampling slots"):
        sampler.sample(logits, [seq_with(temperature=0.0).admit(4)])


def test_top_k_top_p_among_candidates_equals_sorting_whole_rows() -> None:
    """The candidate path (the largest top-k, or 64 tokens, per row) keeps exactly what sorting every row keeps,
    including rows whose nucleus is wider than the candidates (sorted whole) and rows with neither filter."""
    generator = torch.Generator().manual_seed(3)
    rows, vocab = 48, 700
    logits = torch.randn(rows, vocab, generator=generator) * 3.0
    logits[:8] = torch.randn(8, vocab, generator=generator) * 0.05  # flat: a 0.9 nucleus of hundreds of tokens
    top_k = torch.full((rows,), vocab, dtype=torch.int64)
    top_k[8:24] = torch.randint(1, 120, (16,), generator=generator)
    top_p = torch.rand(rows, generator=generator) * 0.9 + 0.05
    top_p[:8] = 0.9
    top_p[40:] = 1.0  # rows 40..47: top-p off (top-k off too: untouched)
    fast = _mask_top_k_top_p(logits, top_k, top_p, int(top_k[top_k < vocab].max()))
    whole = _mask_top_k_top_p_by_sorting(logits, top_k, top_p)
    assert torch.equal(fast.isfinite(), whole.isfinite())
    assert torch.equal(fast[fast.isfinite()], logits[fast.isfinite()])
    assert fast[:8].isfinite().sum(dim=-1).min() > 64  # the flat rows did go past the candidates
    assert fast[40:].isfinite().all()
