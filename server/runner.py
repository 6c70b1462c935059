"""Runs the app under uvicorn with a graceful drain on SIGTERM/SIGINT instead of uvicorn's immediate close."""
import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from scheduler.config import EngineConfig
from server.admission import DRAIN_ABORT_GRACE_S
from server.app import build_app
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.state import ServerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On the first signal: refuse new requests (503), let in-flight ones finish up to the shutdown timeout,
    abort the rest, then stop. A second signal skips the wait. The listening socket stays open while draining
    so that clients get a 503 rather than a refused connection."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is None or not self.started:
            self.should_exit = True  # nothing admitted yet: stop at once
            return
        self.loop.call_soon_threadsafe(self.begin_drain, signal.Signals(sig).name)

    def begin_drain(self, signal_name: str) -> None:
        if self.drain_task is None:
            logger.info("%s received: draining", signal_name)
            self.drain_task = asyncio.create_task(self.drain_then_exit(self.state.config.shutdown_timeout))
        else:
            logger.info("%s received again: aborting in-flight requests now", signal_name)
            asyncio.create_task(self.state.admission.drain(0.0))

    async def drain_then_exit(self, timeout: float) -> None:
        try:
            await self.state.admission.drain(timeout)
        finally:
            self.should_exit = True

    def stop_after_failure(self) -> None:
        self.should_exit = True


def run_server(config: ServerConfig, engine_config: EngineConfig, info: dict[str, str]) -> int:
    """Serves until a signal (exit status 0), a failed model load, a signal before the model loaded or a dead engine
    (exit status 1)."""
    metrics = ServerMetrics(config.model_name, info, vllm_aliases=config.vllm_metrics)
    state = ServerState(config, engine_config, metrics)
    uvicorn_config = uvicorn.Config(
        app=None,
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(DRAIN_ABORT_GRACE_S),
        lifespan="on",
    )
    server = DrainingServer(uvicorn_config, state)
    uvicorn_config.app = build_app(state, on_load_failure=server.stop_after_failure)
    server.run()
    if state.engine is None and state.load_error is None:
        logger.error("the server stopped before the model was loaded")
    served = state.engine is not None and state.load_error is None and state.engine_error is None
    return 0 if served else 1
