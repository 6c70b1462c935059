"""Everything the routes share: configuration, the engine once loaded, admission, metrics, readiness."""
import asyncio
import logging
import threading
from collections.abc import Callable

from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from server.admission import Admission
from server.chat_template import ChatRenderer, load_chat_template
from server.config import ServerConfig
from server.errors import APIError
from server.metrics import ServerMetrics
from server.token_text import TokenTexts
from server.tokenization import Tokenization

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = "10"
ENGINE_DEAD_EXIT_GRACE_S = 3.0  # after the engine died: time for the failed streams to send their error events
LOAD_STOP_TIMEOUT_S = 10.0  # at shutdown, how long a model load may take to give up (an engine process is killed)


class ServerState:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self.engine_config = engine_config
        self.metrics = metrics
        self.admission = Admission(config.max_concurrent_requests)
        self.engine: AsyncEngine | None = None
        self.tokenization: Tokenization | None = None
        self.token_texts: TokenTexts | None = None
        self.load_error: BaseException | None = None
        self.engine_error: BaseException | None = None  # the engine process died: the server exits non-zero
        self._stop_loading = threading.Event()
        self._loader: threading.Thread | None = None
        self._load_lock = threading.Lock()
        self._built: AsyncEngine | None = None  # once constructed, even if the load was cancelled meanwhile

    async def load(self, on_failure: Callable[[], None]) -> None:
        """Builds the engine in a daemon thread (minutes for a large checkpoint) while probes answer."""
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[AsyncEngine] = loop.create_future()

        def engine_died(error: BaseException) -> None:  # called on the engine's output thread
            loop.call_soon_threadsafe(self.engine_died, error, on_failure)

        def build() -> None:
            try:
                engine = AsyncEngine(self.engine_config, stats_listener=self.metrics.stats_listener,
                                     engine_process=self.config.engine_process, on_dead=engine_died,
                                     cancel_start=self._stop_loading)
            except BaseException as error:  # reported through the future, then the server exits
                _settle(loop, loaded, error)
                return
            with self._load_lock:
                if self._stop_loading.is_set():  # shutdown came first: this engine is never served
                    engine.shutdown()
                    return
                self._built = engine
            _settle(loop, loaded, engine)

        self._loader = threading.Thread(target=build, name="engine-load", daemon=True)
        self._loader.start()
        try:
            engine = await loaded
            renderer = ChatRenderer(engine.tokenizer, load_chat_template(self.engine_config.chat_template))
            engine.start()
        except Exception as error:
            if isinstance(error, (ValueError, FileNotFoundError)):  # a checkpoint or flag refused: its message says why
                logger.error("loading the model failed: %s: %s", type(error).__name__, error)
            else:
                logger.exception("loading the model failed")
            self.load_error = error
            on_failure()
            return
        self.tokenization = Tokenization(engine.tokenizer, renderer, engine.vocab_size)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.engine = engine
        info = engine.info
        self.metrics.update_info({
            "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
            "num_kv_blocks": str(engine.num_kv_blocks), "weight_dtype": info.weight_dtype,
            "weight_bytes": str(info.weight_bytes), "kv_cache_dtype": info.kv_cache_dtype,
            "attention_backend": info.attention_backend, "moe_backend": info.moe_backend,
            "cuda_graphs": str(info.cuda_graphs).lower(),
        })
        logger.info(
            "model %s ready: max_model_len=%d, %d KV blocks", self.config.model_name, engine.max_model_len,
            engine.num_kv_blocks,
        )

    def engine_died(self, error: BaseException, on_failure: Callable[[], None]) -> None:
        """Every request has failed with a 503 (the engine ended their streams); the server exits after a grace."""
        if self.engine_error is not None:
            return
        self.engine_error = error
        logger.error("the engine died (%s); the server exits in %.0fs", error, ENGINE_DEAD_EXIT_GRACE_S)
        asyncio.get_running_loop().call_later(ENGINE_DEAD_EXIT_GRACE_S, on_failure)

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_alive and not self.admission.draining

    def ready_engine(self) -> AsyncEngine:
        """The engine, or 503 while loading, draining or after the engine died."""
        if self.admission.draining:
            raise APIError(503, "The server is shutting down.", code="server_draining", headers={"Retry-After": "5"})
        if self.engine is None:
            raise APIError(
                503, "The model is still loading; retry shortly.", code="model_loading",
                headers={"Retry-After": LOADING_RETRY_AFTER_S},
            )
        if not self.engine.is_alive:
            raise APIError(503, "The engine has stopped; the server needs a restart.", code="engine_dead")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise APIError(
                404, f"The model '{model}' does not exist; this server serves '{self.config.model_name}'.",
                param="model", code="model_not_found",
            )

    def check_priority(self, priority: int) -> int:
        """A request's ``priority``: any value under the priority policy, only the default 0 under fcfs (as vLLM)."""
        if priority != 0 and self.engine_config.scheduling_policy != "priority":
            raise APIError(400, f"Got priority {priority}, but this server schedules first come, first served; "
                           "start it with --scheduling-policy priority to use priorities.", param="priority")
        return priority

    def shutdown(self) -> None:
        """Stops a load in progress (killing the engine process) or the loaded engine."""
        with self._load_lock:
            self._stop_loading.set()
        if self._loader is not None:
            self._loader.join(LOAD_STOP_TIMEOUT_S)
        if self.tokenization is not None:
            self.tokenization.close()
        if self._built is not None:
            self._built.shutdown()


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome: object) -> None:
    """Resolves ``future`` from another thread, unless the load was cancelled (the future or the loop is gone)."""
    def resolve() -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the event loop is closed
        pass
