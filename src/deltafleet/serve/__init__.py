"""Serving: the multi-tenant engine (engine/) and, on top of it, the HTTP API."""
