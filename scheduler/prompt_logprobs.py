"""Prompt logprobs: the logits rows a step computed for prompt positions, scored against the next prompt token."""
import logging

import torch

from scheduler.request import Request
from scheduler.sampler import logprobs_with_top
from scheduler.step_plan import StepPlan

logger = logging.getLogger(__name__)


def record_prompt_logprobs(plan: StepPlan, logits: torch.Tensor, requests: dict[str, Request],
                           failed: dict[str, str]) -> None:
    """Appends each span's logprobs to its request; a request whose span fails is put in ``failed``."""
    for span in plan.prompt_logprob_spans:
        seq = span.seq
        try:
            targets = seq.token_ids[span.first_position + 1 : span.first_position + 1 + span.num_rows]
            rows = logits[span.first_row : span.first_row + span.num_rows]
            top_k = seq.params.prompt_logprobs
            requests[seq.request_id].prompt_logprobs.extend(logprobs_with_top(rows, targets, [top_k] * len(targets)))
        except Exception as error:
            logger.exception("prompt logprobs of request %s failed", seq.request_id)
            failed.setdefault(seq.request_id, f"prompt logprobs failed: {error!r}")
