"""Compiles constraints on worker threads, once per key: a repeated (or concurrently requested) schema shares one
compilation, and the engine step never waits for one.

``submit`` returns the key's future at once: a new one starts compiling on a worker, an equal key already compiling or
compiled (failed ones too) gets the same future. The cache keeps the most recently used ``cache_size`` keys; an
evicted grammar stays valid for whoever holds it.
"""
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from scheduler.structured_output.backend import CompiledGrammar, GrammarBackend
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

DEFAULT_CACHE_SIZE = 256
MAX_COMPILE_WORKERS = 4


def compile_error(future: Future) -> str | None:
    """Why ``future`` has no grammar, or None if it has one (waits for it)."""
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
            if future is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
                return future
            self.misses += 1
            future = self._workers.submit(self.backend.compile, spec)
            self._cache[spec.key] = future
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

    def shutdown(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)
