"""Pydantic request models mirroring OpenAI's schemas, plus this server's extensions."""
