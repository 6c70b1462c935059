"""The one contract of the start-up self-checks, and choosing a backend on them.

A self-check runs a fast path against its reference on the device that will serve and returns a
``SelfCheckResult``; it never raises (an exception in the fast path is a failed result naming it). The caller
decides: ``select_backend`` refuses an explicit ``triton`` that failed (a ValueError naming the check) and serves
``auto`` with the torch reference, logging why.
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

BACKEND_CHOICES = ("auto", "torch", "triton")
Backend = TypeVar("Backend")


@dataclass(frozen=True)
class SelfCheckResult:
    check: str  # the check's name, e.g. "check_fused_moe"
    passed: bool
    detail: str  # what passed, or what went wrong
    max_abs_diff: float | None = None  # largest difference from the reference, where one was measured

    @classmethod
    def failed_by(cls, check: str, error: Exception) -> "SelfCheckResult":
        """A check that could not run: compilation, launch or device errors all mean "do not use this path"."""
        return cls(check, False, f"{type(error).__name__}: {error}")

    def describe(self) -> str:
        difference = "" if self.max_abs_diff is None else f", max abs diff {self.max_abs_diff:.2e}"
        return f"{self.check}: {'pass' if self.passed else 'FAIL'}: {self.detail}{difference}"


def select_backend(seam: str, flag: str, requested: str, device: torch.device, reference: Callable[[], Backend],
                   fast: Callable[[], Backend], self_check: Callable[[], SelfCheckResult],
                   logger: logging.Logger) -> Backend:
    """The torch ``reference`` for "torch" (and "auto" off CUDA), else the ``fast`` triton backend once
    ``self_check`` passed. A failed check refuses an explicit "triton" and sends "auto" to the reference."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"unknown {seam} backend {requested!r} ({flag}): use one of {', '.join(BACKEND_CHOICES)}")
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return reference()
    result = self_check()
    if not result.passed:
        failure = f"the triton {seam} backend failed its self-check ({result.check}) on {device}: {result.detail}"
        if requested == "triton":
            raise ValueError(f"{flag} triton: {failure}; use auto or torch")
        logger.warning("%s; using the torch %s backend", failure, seam)
        return reference()
    logger.info("%s backend: triton (%s)", seam, result.describe())
    return fast()
