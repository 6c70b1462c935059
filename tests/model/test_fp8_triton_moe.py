"""FP8 experts through the triton MoE backend (the moe kernels' FP8 weight-only variant under TRITON_INTERPRET=1 on
the CPU): the model's logits equal the torch backend's, which dequantizes one expert at a time."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported: it decides how @triton.jit runs

import torch  # noqa: E402
from dots1_reference import build_reference  # noqa: E402
from fp8_checkpoint import write_fp8_checkpoint  # noqa: E402
from paged_runner import PagedRunner  # noqa: E402

from model.loader import load_model  # noqa: E402

PROMPTS = {0: [5, 17, 3, 88, 41], 1: [9, 2]}


def test_triton_fp8_experts_match_the_torch_backend(tmp_path):
    build_reference(tmp_path / "fp32", num_hidden_layers=1, first_k_dense_replace=0)
    write_fp8_checkpoint(tmp_path / "fp32", tmp_path / "fp8")
    outputs = {}
    for backend in ("torch", "triton"):
        model = load_model(tmp_path / "fp8", dtype=torch.float32, device="cpu", moe_backend=backend)
        experts = model.layers[0].mlp.experts
        assert model.layers[0].mlp.backend.name == backend
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        runner = PagedRunner(model)
        prefill = runner.step(PROMPTS, all_logits=True)
        decode = runner.step({seq: [int(logits[-1].argmax())] for seq, logits in zip(PROMPTS, prefill)})
        outputs[backend] = torch.cat([*prefill, *(logits[None] for logits in decode)])
    assert (outputs["triton"] - outputs["torch"]).abs().max().item() < 1e-4
