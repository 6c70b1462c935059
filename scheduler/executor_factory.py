"""Picks the model executor for a configuration: one process, or one rank per GPU (tensor parallel)."""
import logging

from scheduler.config import EngineConfig
from scheduler.model_runner import ModelExecutor
from scheduler.parallel_executor import ParallelExecutor

logger = logging.getLogger(__name__)


def create_executor(config: EngineConfig) -> ModelExecutor | ParallelExecutor:
    if config.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {config.tensor_parallel_size}")
    if config.tensor_parallel_size > 1:
        return ParallelExecutor(config)
    if config.enable_expert_parallel:
        logger.warning("--enable-expert-parallel has no effect with --tensor-parallel-size 1")
    return ModelExecutor(config)
