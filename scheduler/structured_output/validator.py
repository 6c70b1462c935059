"""The front end's check of a constraint before it sends a request: cheap, cached, and no compilation.

The engine core compiles each grammar once per key, off its step. The front end only validates (the backend parses
and checks the grammar against the tokenizer without building a matcher), so that a constraint the backend cannot
enforce is answered with a 400 naming it before anything is queued or streamed. A constraint that passes here but
still fails to compile in the core fails its request alone, with the error as its output.
"""
import threading
from collections import OrderedDict

from scheduler.sampling_params import InvalidParameterError, SamplingParams
from scheduler.structured_output.backend import GrammarBackend
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec, unenforceable

DEFAULT_CACHE_SIZE = 1024
CONSTRAINT_PARAM = "response_format"


class ConstraintValidator:
    def __init__(self, backend: GrammarBackend, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()  # key -> error, None if valid
        self._lock = threading.Lock()

    def validate(self, spec: StructuredOutputSpec) -> None:
        """Raises ``InvalidConstraintError`` if ``spec`` cannot be enforced. Thread-safe; may take a few
        milliseconds for a large schema seen for the first time (call it off the event loop)."""
        with self._lock:
            known = spec.key in self._verdicts
            verdict = self._verdicts.get(spec.key)
            if known:
                self._verdicts.move_to_end(spec.key)
        if not known:
            try:
                self.backend.validate(spec)
            except InvalidConstraintError as error:
                verdict = str(error)
            with self._lock:
                self._verdicts[spec.key] = verdict
                while len(self._verdicts) > self.cache_size:
                    self._verdicts.popitem(last=False)
        if verdict is not None:
            raise InvalidConstraintError(verdict)


def check_constraint(validator: ConstraintValidator, params: SamplingParams) -> None:
    """The offline API's check: InvalidParameterError if the request's constraint cannot be enforced."""
    if params.structured_output is None:
        return
    try:
        validator.validate(params.structured_output)
    except InvalidConstraintError as error:
        raise InvalidParameterError(CONSTRAINT_PARAM, unenforceable(str(error))) from None
