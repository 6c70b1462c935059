"""Which implementation runs the routed experts: "torch" (the reference and the CPU path) or "triton" (fused MoE).

"auto" is triton on CUDA and torch elsewhere. Asked for explicitly, triton runs wherever Triton does (the CPU under
TRITON_INTERPRET=1 included). Either way it must first pass a self-check on the real device; if it does not, an
explicit triton refuses to start (a ValueError naming the check), and auto serves with the torch backend and the log
says why.
"""
import logging

import torch

logger = logging.getLogger(__name__)

MOE_BACKENDS = ("auto", "torch", "triton")


def resolve_moe_backend(requested: str, device: torch.device | str, dtype: torch.dtype, fp8: bool = False,
                        has_moe_layers: bool = True) -> str:
    """"torch" or "triton" for ``requested``; triton only once ``check_fused_moe`` passed on ``device`` (with
    ``fp8``, its FP8 variant too), else a ValueError for an explicit "triton". A model without MoE layers needs no
    check."""
    if requested not in MOE_BACKENDS:
        raise ValueError(f"unknown moe_backend {requested!r}: use one of {', '.join(MOE_BACKENDS)}")
    device = torch.device(device)
    if requested == "torch" or (requested == "auto" and device.type != "cuda") or not has_moe_layers:
        return "torch"
    try:
        from model.kernels.moe.self_check import check_fused_moe
    except ImportError as error:  # no Triton on this machine
        failure: str | None = f"{type(error).__name__}: {error}"
    else:
        failure = check_fused_moe(device, dtype, fp8=fp8)
    if failure is not None:
        failure = f"the triton MoE backend failed its self-check (check_fused_moe) on {device} in {dtype}: {failure}"
        if requested == "triton":
            raise ValueError(f"--moe-backend triton: {failure}; use auto or torch")
        logger.warning("%s; using the torch backend", failure)
        return "torch"
    logger.info("MoE backend: triton (fused MoE self-check passed on %s in %s)", device, dtype)
    return "triton"
