"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): an adapter over the chat pipeline."""
