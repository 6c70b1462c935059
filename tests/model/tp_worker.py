"""One tensor-parallel rank (gloo, CPU) that loads its shard of a checkpoint and runs a batch."""
import os
from pathlib import Path

import torch
import torch.distributed as dist
from paged_runner import PagedRunner

from model.loader import load_model
from model.parallel import ParallelState


def run_rank(rank: int, world_size: int, port: int, model_dir: str, expert_parallel: bool,
             prompts: dict[int, list[int]], decodes: int, out_path: str, quantization: str | None = None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        parallel = ParallelState(rank=rank, world_size=world_size, expert_parallel=expert_parallel)
        model = load_model(Path(model_dir), dtype=torch.float32, device="cpu", parallel=parallel,
                           quantization=quantization)
        logits = generate(PagedRunner(model), prompts, decodes)
        if rank == 0:
            torch.save(logits, out_path)
    finally:
        dist.destroy_process_group()


def generate(runner: PagedRunner, prompts: dict[int, list[int]], decodes: int) -> torch.Tensor:
    """All prompt logits, then greedy decode logits, stacked."""
    outputs = runner.step(prompts, all_logits=True)
    collected = list(outputs)
    tokens = {seq: int(logits[-1].argmax()) for seq, logits in zip(prompts, outputs)}
    for _ in range(decodes):
        step = runner.step({seq: [token] for seq, token in tokens.items()})
        collected.extend(logits[None] for logits in step)
        tokens = {seq: int(logits.argmax()) for seq, logits in zip(tokens, step)}
    return torch.cat(collected)
