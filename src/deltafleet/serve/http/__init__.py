"""The OpenAI-compatible HTTP layer (no torch): protocol, tenancy, metrics, app; the engine sits behind `gateway`."""
