"""A tensor-parallel worker process (ranks 1..N-1): loads its shard, then runs every batch rank 0 broadcasts.

A worker reports a failure to the engine process through its pipe (one line) and exits; it exits too when the
engine process is gone, so no worker outlives the server. It ignores SIGTERM and SIGINT, as the engine process does.
"""
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from model.device import resolve_device
from model.parallel import ParallelState
from scheduler.child_process import become_engine_child
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import StepGraph
from scheduler.model_runner import ModelExecutor
from scheduler.process_group import STORE_HOST, join_process_group, min_over_ranks, rank_device
from scheduler.tp_batch import receive_step

logger = logging.getLogger(__name__)

ORPHAN_POLL_S = 1.0
EXIT_FAILED = 1
EXIT_ORPHANED = 3


def run_worker(rank: int, world_size: int, store_port: int, config: EngineConfig, num_threads: int,
               error_pipe: Connection, parent_pid: int, log_level: int,
               make_graph: Callable[[], StepGraph] | None = None) -> None:
    """Process entry point (spawned by ParallelExecutor)."""
    become_engine_child()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s",
                        force=True)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="orphan-watch", daemon=True).start()
    try:
        _serve(rank, world_size, store_port, config, num_threads, make_graph)
    except BaseException as error:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        error_pipe.send(f"{type(error).__name__}: {error}")
        logging.shutdown()
        os._exit(EXIT_FAILED)  # skip interpreter teardown: a broken communicator can hang in its destructor


def _serve(rank: int, world_size: int, store_port: int, config: EngineConfig, num_threads: int,
           make_graph: Callable[[], StepGraph] | None) -> None:
    device = rank_device(resolve_device(config.device), rank)
    if device.type == "cpu":
        torch.set_num_threads(num_threads)
    store = dist.TCPStore(STORE_HOST, store_port, world_size, is_master=False)
    control = join_process_group(rank, world_size, store, device)
    parallel = ParallelState(rank=rank, world_size=world_size, expert_parallel=config.enable_expert_parallel)
    # Rank 0 counts expert assignments for the metrics; the router is replicated, so every rank's counts agree.
    executor = ModelExecutor(config, parallel, device, expert_metrics=False, make_graph=make_graph,
                             agree=lambda value: min_over_ranks(value, control))
    while (batch := receive_step(control)) is not None:
        executor.execute(batch)
    executor.shutdown()
    dist.destroy_process_group()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_S)
    os._exit(EXIT_ORPHANED)
