"""Fault injection for tests: environment variables that only the engine reads. Never set them in production.

- ``DOTS_SERVE_FAULT_LOAD_DELAY_S``: the engine sleeps this long before loading the model (a slow load).
- ``DOTS_SERVE_FAULT_INPUT_THREAD_AT``: the engine process's input thread raises on receiving its Nth message.
- ``DOTS_SERVE_FAULT_OUTPUT_THREAD_AT``: the engine process's output thread raises on sending its Nth message.
- ``DOTS_SERVE_FAULT_STEP_AT``: the Nth forward pass of the engine raises (counted from 1).
- ``DOTS_SERVE_FAULT_DEVICE_BROKEN``: ``1``: from that failed forward on, the device check fails too (a sticky
  device error such as an illegal memory access).
- ``DOTS_SERVE_FAULT_GRAMMAR_REJECT_AT``: grammar matchers reject a sequence's Nth output token.
"""
import os

PREFIX = "DOTS_SERVE_FAULT_"


class InjectedFault(RuntimeError):
    """Raised where a fault hook fires."""


def fault_number(name: str) -> float | None:
    """The value of ``DOTS_SERVE_FAULT_<name>``, or None when it is not set."""
    value = os.environ.get(PREFIX + name)
    return float(value) if value else None


def fires_at(name: str, count: int) -> bool:
    """True when ``DOTS_SERVE_FAULT_<name>`` is set to ``count``."""
    return fault_number(name) == count
