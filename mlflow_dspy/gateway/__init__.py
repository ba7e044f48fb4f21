"""Layer 5: the OpenAI-compatible gateway: protocol models, errors, middleware, the app and its runner."""
