"""Compiles constraints through a backend, with a cache keyed by the constraint: a repeated schema costs nothing.

The front end holds one (it compiles in a worker thread, to answer an invalid schema with a 400 before the request
is sent) and the engine core another, in its own process; in-process they are the same object (``front_end_compiler``).
Failures are cached too.
"""
import threading
from collections import OrderedDict

from scheduler.structured_output.backend import CompiledGrammar, GrammarBackend
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

DEFAULT_CACHE_SIZE = 256


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | InvalidConstraintError] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec``; raises ``InvalidConstraintError``. Thread-safe."""
        with self._lock:
            entry = self._cache.get(spec.key)
            if entry is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
        if entry is None:
            try:
                entry = self.backend.compile(spec)
            except InvalidConstraintError as error:
                entry = error
            with self._lock:
                self.misses += 1
                self._cache[spec.key] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(entry, InvalidConstraintError):
            raise InvalidConstraintError(str(entry))
        return entry
