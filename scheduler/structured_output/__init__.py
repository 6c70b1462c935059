"""Grammar-constrained decoding: constraints (``spec``), the backend seam (``backend``), llguidance, the compile
cache (``compiler``) and the engine's hooks (``manager``)."""
