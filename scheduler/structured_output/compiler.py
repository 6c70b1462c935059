"""Compiles constraints on worker threads, once per key: a repeated (or concurrently requested) schema shares one
compilation, and the engine step never waits for one.

``submit`` returns the key's future at once: a new one starts compiling on a worker, an equal key already compiling or
compiled (or found invalid) gets the same future. The cache keeps the most recently used ``cache_size`` keys; an
evicted grammar stays valid for whoever holds it. A compilation that fails unexpectedly (not
``InvalidConstraintError``) fails the requests that waited for it; the next request for its key compiles again.
"""
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from scheduler.structured_output.backend import CompiledGrammar, GrammarBackend
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
MAX_COMPILE_WORKERS = 4


def compile_error(future: Future) -> str | None:
    """Why ``future`` has no grammar, or None if it has one (waits for it)."""
    if future.cancelled():
        return "the grammar's compilation was cancelled (the engine is shutting down)"
    error = future.exception()
    if error is None:
        return None
    return str(error) if isinstance(error, InvalidConstraintError) else f"compiling the grammar failed: {error!r}"


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        # Half the cores at most: compiling shares the CPU with the engine step (and its mask filling).
        workers = max(1, min(MAX_COMPILE_WORKERS, (os.cpu_count() or 1) // 2))
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar-compile")
        self.hits = 0
        self.misses = 0

    def submit(self, spec: StructuredOutputSpec) -> Future[CompiledGrammar]:
        """The compilation of ``spec``: finished if cached, else running or queued on a worker. Thread-safe."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None and not _crashed(future):
                self._cache.move_to_end(spec.key)
                self.hits += 1
                return future
            self.misses += 1
            future = self._workers.submit(self._compile, spec)
            self._cache[spec.key] = future
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """Waits for the compiled grammar of ``spec``; raises ``InvalidConstraintError``."""
        future = self.submit(spec)
        error = compile_error(future)  # waits for it
        if error is not None:
            raise InvalidConstraintError(error)
        return future.result()

    def _compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        try:
            return self.backend.compile(spec)
        except InvalidConstraintError:
            raise
        except Exception:
            logger.exception("compiling a %s constraint failed", spec.kind)
            raise

    def shutdown(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)


def _crashed(future: Future) -> bool:
    """Finished without a grammar for a reason other than the constraint itself (worth compiling again)."""
    if not future.done():
        return False
    return future.cancelled() or not isinstance(future.exception(), (type(None), InvalidConstraintError))
