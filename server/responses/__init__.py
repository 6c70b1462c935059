"""OpenAI's Responses API (``/v1/responses``) as an adapter over the chat pipeline: input items become chat messages,
Responses tools and ``text.format`` become the chat tool setup and grammars, the engine's text becomes output items
and the Responses stream events; finished responses are kept in a bounded store for ``previous_response_id``."""
