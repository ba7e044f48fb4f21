"""The OpenAI-compatible gateway: protocol, program host, middleware, app."""
