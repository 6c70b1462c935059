"""Two CPU processes (gloo) each holding half the model compute the same logits as one process holding all of it."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from dots1_reference import build_reference
from paged_runner import PagedRunner
from tp_worker import generate, run_rank

from model.loader import load_model

PROMPTS = {0: [5, 9, 2, 77, 31, 8], 1: [40, 41], 2: [3, 1, 4, 1, 5, 9, 2, 6, 5]}
DECODES = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tp")
    # Odd vocabulary: the second rank's embedding rows are padded. GQA with 2 kv heads: one per rank.
    build_reference(model_dir, vocab_size=95, num_key_value_heads=2, attention_bias=True, num_hidden_layers=2)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    return model_dir, generate(PagedRunner(model), PROMPTS, DECODES)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor_parallel", "expert_parallel"])
def test_two_ranks_match_one(checkpoint, tmp_path, expert_parallel):
    model_dir, expected = checkpoint
    out_path = tmp_path / "logits.pt"
    mp.spawn(run_rank, args=(2, free_port(), str(model_dir), expert_parallel, PROMPTS, DECODES, str(out_path)),
             nprocs=2, join=True)
    actual = torch.load(out_path)
    assert actual.shape == expected.shape == (sum(map(len, PROMPTS.values())) + DECODES * len(PROMPTS), 95)
    assert (actual - expected).abs().max().item() < 1e-4
