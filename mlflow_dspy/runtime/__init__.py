"""Layer 3: run a loaded program.

* `host`: `ProgramHost`, one chat program with its LM and adapter, answering,
  streaming and predicting per request inside a `dspy.context`;
* `fast_adapter`, `field_stream`: DSPy's ChatAdapter prompts without per-call
  overhead, and field text as the LM writes it;
* `scoring`: a program scored on a set of examples with `dspy.Evaluate`.

The gateway, batch scoring and eval all use this room; it imports only from
`program` and `lm_engine`.
"""
