"""Two gloo ranks on an FP8 checkpoint (each reading its slice of the float8 weights and of their scales), and on
a float32 one quantized while loading (row-parallel scales from whole rows), give the tokens of one process."""
import pytest
import torch
import torch.multiprocessing as mp
from dots1_reference import build_reference
from fp8_checkpoint import write_fp8_checkpoint
from paged_runner import PagedRunner
from test_model_tensor_parallel import free_port
from tp_worker import generate, run_rank

from model.loader import load_model

PROMPTS = {0: [5, 9, 2, 77, 31, 8], 1: [40, 41], 2: [3, 1, 4, 1, 5, 9, 2, 6, 5]}
DECODES = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_tp")
    # Odd vocabulary (padded rows on rank 1), one kv head per rank, per-tensor scales to slice as well as per-row.
    build_reference(root / "fp32", vocab_size=95, num_key_value_heads=2, attention_bias=True, num_hidden_layers=2)
    write_fp8_checkpoint(root / "fp32", root / "fp8")
    write_fp8_checkpoint(root / "fp32", root / "fp8_tensor", strategy="tensor")
    return root


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


CASES = {  # checkpoint, expert parallel, --quantization
    "per_channel_split_experts": ("fp8", False, None),
    "per_tensor_expert_parallel": ("fp8_tensor", True, None),
    "online_split_experts": ("fp32", False, "fp8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_match_one(checkpoints, tmp_path, case):
    name, expert_parallel, quantization = CASES[case]
    model_dir = checkpoints / name
    one = load_model(model_dir, dtype=torch.float32, device="cpu", quantization=quantization)
    assert one.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    expected = generate(PagedRunner(one), PROMPTS, DECODES)
    out_path = tmp_path / "logits.pt"
    mp.spawn(run_rank, args=(2, free_port(), str(model_dir), expert_parallel, PROMPTS, DECODES, str(out_path),
                             quantization), nprocs=2, join=True)
    actual = torch.load(out_path)
    assert greedy_tokens(actual) == greedy_tokens(expected)
    assert (actual - expected).abs().max().item() < 1e-4
