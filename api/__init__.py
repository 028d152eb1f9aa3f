"""The HTTP API: a thin Flask layer over the engine."""
