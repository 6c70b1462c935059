"""Lays a step's scheduled sequences out as one flat ForwardBatch and says which logits rows serve what."""
from dataclasses import dataclass

from model.forward_batch import ForwardBatch
from scheduler.sequence import Sequence


@dataclass
class PromptLogprobSpan:
    """Logits rows ``first_row .. first_row + num_rows`` hold positions ``first_position ..`` of ``seq``'s prompt."""

    seq: Sequence
    first_row: int
    num_rows: int
    first_position: int


@dataclass
class StepPlan:
    batch: ForwardBatch
    sample_seqs: list[Sequence]  # sequences that get a new token this step
    sample_rows: list[int]  # their logits rows, in the same order
    prompt_logprob_spans: list[PromptLogprobSpan]


def plan_step(scheduled: list[tuple[Sequence, int]], block_size: int) -> StepPlan:
    """A sequence samples when this step computes its last token; logits at prompt position p score token p + 1."""
    token_ids, num_cached, block_tables, logits_indices = [], [], [], []
    sample_seqs: list[Sequence] = []
    sample_rows: list[int] = []
    spans: list[PromptLogprobSpan] = []
    flat_start = 0
    for seq, num_new in scheduled:
        start = seq.num_computed_tokens
        end = start + num_new
        token_ids.append(seq.token_ids[start:end])
        num_cached.append(start)
        block_tables.append(seq.block_table)
        if seq.needs_prompt_logprobs:
            last_scored = min(end, seq.num_prompt_tokens - 1)
            if last_scored > start:
                spans.append(PromptLogprobSpan(seq, len(logits_indices), last_scored - start, start))
                logits_indices.extend(range(flat_start, flat_start + last_scored - start))
        if end == seq.num_tokens:
            sample_seqs.append(seq)
            sample_rows.append(len(logits_indices))
            logits_indices.append(flat_start + num_new - 1)
        flat_start += num_new
    batch = ForwardBatch.build(token_ids, num_cached, block_tables, block_size, logits_indices)
    return StepPlan(batch, sample_seqs, sample_rows, spans)
