"""The OpenAI-compatible HTTP front end: FastAPI routes, request models, SSE streaming, errors, CLI."""
