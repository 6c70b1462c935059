"""The model executor for --tensor-parallel-size N > 1: rank 0 here, ranks 1..N-1 in worker processes.

Every step rank 0 broadcasts the batch (scheduler/tp_batch.py), then all ranks run the same forward on their shard;
only rank 0's logits are used. The block manager stays in the engine process: every rank holds the same number of
KV blocks (the minimum any rank's budget allows), each block holding only that rank's heads.

Rank 0's collectives run on a thread of their own while the caller waits and watches the workers, so a dead worker
turns into an error within a poll interval even when a collective would block. Any failure is final: the ranks
may have diverged, so the executor raises TensorParallelError (an EngineDeadError) from then on.
"""
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_exit

from model.config import ModelConfig
from model.device import resolve_device, resolve_dtype
from model.forward_batch import ForwardBatch
from model.parallel import ParallelState
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import StepGraph
from scheduler.model_runner import ModelExecutor
from scheduler.outputs import EngineDeadError
from scheduler.parallel_worker import run_worker
from scheduler.process_group import STORE_HOST, join_process_group, min_over_ranks, rank_device
from scheduler.tp_batch import send_shutdown, send_step

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting caller and the watchdog look at the workers
WORKER_EXIT_GRACE_S = 10.0  # after the shutdown command, before workers are killed
CLOSE_TIMEOUT_S = 5.0  # for the shutdown broadcast and tearing down the process group


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died or failed; the executor cannot run again."""


class _Rank0Thread:
    """Runs rank 0's jobs (setup, steps, teardown) in order on one daemon thread."""

    def __init__(self, device: torch.device, num_threads: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(device, num_threads), name="tp-rank0", daemon=True).start()

    def submit(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self, device: torch.device, num_threads: int) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(num_threads)
        while (item := self._jobs.get()) is not None:
            job, future = item
            try:
                future.set_result(job())
            except BaseException as error:
                future.set_exception(error)


class ParallelExecutor:
    def __init__(self, config: EngineConfig, make_graph: Callable[[], StepGraph] | None = None) -> None:
        """``make_graph``: as for ModelExecutor, on every rank (it must pickle: a class, not a closure)."""
        self.world_size = config.tensor_parallel_size
        if self.world_size < 2:
            raise ValueError(f"ParallelExecutor needs tensor_parallel_size >= 2, got {self.world_size}")
        requested = resolve_device(config.device)
        _check_devices(requested, self.world_size)
        self.device = rank_device(requested, 0)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.num_kv_blocks = 0
        self._failure: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._stop_watchdog = threading.Event()
        self._shard: ModelExecutor | None = None  # rank 0's own model, KV cache and graphs
        self._control: dist.ProcessGroup | None = None
        num_threads = max(1, torch.get_num_threads() // self.world_size)  # CPU ranks share the machine's cores
        self._rank0 = _Rank0Thread(self.device, num_threads)
        store = dist.TCPStore(STORE_HOST, 0, self.world_size, is_master=True, wait_for_workers=False)
        self._workers: list[mp.Process] = []
        self._error_pipes: list[Connection] = []
        context = mp.get_context("spawn")
        try:
            for rank in range(1, self.world_size):
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=run_worker, name=f"dots-serve-tp{rank}", daemon=True,
                    args=(rank, self.world_size, store.port, config, num_threads, writer, os.getpid(),
                          logging.getLogger().getEffectiveLevel(), make_graph),
                )
                process.start()
                writer.close()
                self._workers.append(process)
                self._error_pipes.append(reader)
                logger.info("tensor-parallel rank %d: worker process pid %d", rank, process.pid)
            self._wait(self._rank0.submit(lambda: self._setup(config, store, make_graph)))
        except BaseException:
            self._closed = True
            self._stop_workers(grace_s=0.0)
            self._close_process_group()
            self._rank0.stop()
            raise
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    @property
    def weight_dtype(self) -> str:
        """The weights' dtype(s) in words, e.g. "float8_e4m3fn+bfloat16" (every rank holds the same)."""
        return self._shard.weight_dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights on rank 0 (each rank holds about as much)."""
        return self._shard.weight_bytes

    @property
    def moe_backend(self) -> str:
        return self._shard.moe_backend

    @property
    def cuda_graphs(self) -> bool:
        """Whether pure-decode steps replay captured CUDA graphs (on every rank, or on none)."""
        return self._shard.cuda_graphs

    @property
    def worker_pids(self) -> list[int]:
        return [process.pid for process in self._workers]

    @property
    def is_alive(self) -> bool:
        self._check_workers()
        return self._failure is None and not self._closed

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs one step on every rank; rank 0's float32 logits [len(batch.logits_indices), vocab]."""
        if self._closed:
            raise TensorParallelError("the tensor-parallel executor is shut down")
        self._raise_if_failed()
        try:
            return self._wait(self._rank0.submit(lambda: self._step(batch)))
        except TensorParallelError:
            raise
        except Exception as error:
            self._await_worker_exit(1.0)  # a peer's death usually surfaces first as a closed connection on rank 0
            self._raise_if_failed()
            raise TensorParallelError(self._record_failure(f"tensor-parallel rank 0 failed a step: {error!r}")) \
                from error

    def take_expert_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """Rank 0's counts: the router runs replicated, so they cover every token on every rank."""
        if self._shard is None or self._shard.model is None:
            return None
        return self._shard.take_expert_counts()

    def shutdown(self) -> None:
        """Ends every worker (a shutdown command, then kill) and releases rank 0's shard. Safe to call twice."""
        if self._closed:
            return
        self._closed = True  # from here on workers exiting is expected, not a failure
        self._stop_watchdog.set()
        grace_s = 0.0
        if self._failure is None:
            wait_for([self._rank0.submit(lambda: send_shutdown(self._control))], timeout=CLOSE_TIMEOUT_S)
            grace_s = WORKER_EXIT_GRACE_S
        self._stop_workers(grace_s)
        self._close_process_group()
        self._rank0.stop()
        if self._shard is not None and self._failure is None:
            self._shard.shutdown()  # after a failure a stuck collective could block freeing device memory

    def _setup(self, config: EngineConfig, store: dist.Store, make_graph: Callable[[], StepGraph] | None) -> None:
        self._control = join_process_group(0, self.world_size, store, self.device)
        parallel = ParallelState(rank=0, world_size=self.world_size, expert_parallel=config.enable_expert_parallel)
        self._shard = ModelExecutor(config, parallel, self.device, make_graph=make_graph,
                                   agree=lambda value: min_over_ranks(value, self._control))
        self.num_kv_blocks = self._shard.num_kv_blocks
        self.kv_cache_dtype = self._shard.kv_cache_dtype  # resolved, as on ModelExecutor (rank 0's)
        self.attention_backend = self._shard.attention_backend

    def _step(self, batch: ForwardBatch) -> torch.Tensor:
        send_step(batch, self._control)
        logits = self._shard.execute(batch)
        if self.device.type == "cuda":
            # Wait here, where the caller watches the workers: a collective stuck on a dead peer must not block the
            # engine's next sync instead (the sampler syncs on these logits right after anyway).
            torch.cuda.synchronize(self.device)
        return logits

    def _wait(self, future: Future) -> Any:
        """The job's result; raises TensorParallelError as soon as a worker is seen dead while waiting."""
        while not wait_for([future], timeout=POLL_S).done:
            self._raise_if_failed()
        return future.result()

    def _watch(self) -> None:
        while not self._stop_watchdog.wait(POLL_S) and self._failure is None:
            self._check_workers()

    def _check_workers(self) -> None:
        with self._lock:
            if self._failure is not None or self._closed:
                return
            for rank, (process, pipe) in enumerate(zip(self._workers, self._error_pipes), start=1):
                if process.exitcode is None:
                    continue
                how = (f"was killed by {signal.Signals(-process.exitcode).name}" if process.exitcode < 0
                       else f"exited with code {process.exitcode}")
                reason = _reported_error(pipe)
                self._record_failure(f"tensor-parallel worker rank {rank} (pid {process.pid}) {how}{reason}")
                return

    def _record_failure(self, message: str) -> str:
        if self._failure is None:
            self._failure = message
            logger.error("%s; the engine cannot continue", message)
        return self._failure

    def _raise_if_failed(self) -> None:
        self._check_workers()
        if self._failure is not None:
            raise TensorParallelError(self._failure)

    def _await_worker_exit(self, timeout_s: float) -> None:
        wait_for_exit([process.sentinel for process in self._workers], timeout_s)

    def _stop_workers(self, grace_s: float) -> None:
        pending = [process.sentinel for process in self._workers]
        deadline = time.monotonic() + grace_s
        while pending and time.monotonic() < deadline:
            exited = wait_for_exit(pending, deadline - time.monotonic())
            pending = [sentinel for sentinel in pending if sentinel not in exited]
        for process in self._workers:
            if process.is_alive():
                process.kill()  # workers ignore SIGTERM
                process.join()

    def _close_process_group(self) -> None:
        """Destroys rank 0's process groups so a later executor in this process can start again."""
        def destroy() -> None:
            if dist.is_initialized():
                dist.destroy_process_group()
        wait_for([self._rank0.submit(destroy)], timeout=CLOSE_TIMEOUT_S)


def _reported_error(pipe: Connection) -> str:
    """": <the worker's error>" when it sent one before exiting, else ""."""
    try:
        return f": {pipe.recv()}" if pipe.poll() else ""
    except (EOFError, OSError):
        return ""


def _check_devices(device: torch.device, world_size: int) -> None:
    if device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise ValueError(f"with tensor parallelism rank r runs on cuda:r; use --device cuda (not {device}) and "
                         "CUDA_VISIBLE_DEVICES to pick the GPUs")
    available = torch.cuda.device_count()
    if available < world_size:
        raise ValueError(f"--tensor-parallel-size {world_size} needs {world_size} GPUs, found {available}")
