"""Layer 5: the OpenAI-compatible gateway.

The road of a request is drawn in app.py. The rooms:

- `app`: the Gateway: what serves, and the layers every request passes;
- `context`: what the gateway knows of one request (typed), `admission`: what a request must pass
  before a route reads it, `errors`: every failure as an OpenAI error object;
- a room per protocol, each with its wire models, its validation and its encoder of the one run
  (runtime/run.py): `chat/`, `responses/`, `predict/`, `invocations/`; `dspy_client`: DSPy's own
  adapter prompts recognised; `openai_wire`: what the OpenAI-shaped routes share;
- `served_models` and `router`: the programs served and the registry's names, aliases and splits;
- `tracing`: which requests are traced, and the process that stores their traces;
  `feedback`: verdicts on answers, `feedback_tokens`: the right to give one, bound to the caller;
  `metrics`: /metrics; `openapi`: /openapi.json beyond the signatures;
- `config`: every setting, declared once; `server`: uvicorn, with one worker or several.
"""
