"""One contract for choosing a backend on its self-check, the same for attention and MoE: no Triton needed."""
import logging

import pytest
import torch

from model.self_check import SelfCheckResult, select_backend


class Reference:
    name = "torch"


class Fast:
    name = "triton"


def choose(requested: str, device: str, result: SelfCheckResult | None) -> str:
    """The chosen backend's name; ``result`` None: the self-check must not run."""
    def self_check() -> SelfCheckResult:
        assert result is not None, "the self-check ran"
        return result

    backend = select_backend("MoE", "--moe-backend", requested, torch.device(device), Reference, Fast, self_check,
                             logging.getLogger("test_backend_selection"))
    return backend.name


PASSED = SelfCheckResult("check_kernels", True, "3 batches", 2e-6)
FAILED = SelfCheckResult("check_kernels", False, "output off by 0.5", 0.5)


def test_torch_and_auto_off_cuda_never_run_the_check():
    assert choose("torch", "cuda", None) == "torch"
    assert choose("auto", "cpu", None) == "torch"


def test_a_passed_check_serves_triton_on_request_and_on_auto_on_cuda(caplog):
    with caplog.at_level(logging.INFO, logger="test_backend_selection"):
        assert choose("triton", "cpu", PASSED) == "triton"
        assert choose("auto", "cuda", PASSED) == "triton"
    assert "MoE backend: triton (check_kernels: pass: 3 batches, max abs diff 2.00e-06)" in caplog.text


def test_a_failed_check_refuses_explicit_triton_and_sends_auto_to_torch(caplog):
    with pytest.raises(ValueError) as refused:
        choose("triton", "cuda", FAILED)
    assert str(refused.value) == ("--moe-backend triton: the triton MoE backend failed its self-check (check_kernels) "
                                  "on cuda: output off by 0.5; use auto or torch")
    with caplog.at_level(logging.WARNING, logger="test_backend_selection"):
        assert choose("auto", "cuda", FAILED) == "torch"
    assert ("failed its self-check (check_kernels) on cuda: output off by 0.5; using the torch MoE backend"
            in caplog.text)


def test_an_unknown_name_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"unknown MoE backend 'cutlass' \(--moe-backend\): use one of auto, torch, "
                                         "triton"):
        choose("cutlass", "cuda", None)


def test_a_check_that_raised_is_a_failed_result_naming_the_error():
    result = SelfCheckResult.failed_by("check_kernels", RuntimeError("no kernel image for this device"))
    assert not result.passed and result.max_abs_diff is None
    assert result.describe() == "check_kernels: FAIL: RuntimeError: no kernel image for this device"
