"""Layer 3: run a loaded program.

* `host`: `ProgramHost`, one chat program with its LM and adapter, answering,
  streaming and predicting per request inside a `dspy.context`;
* `field_stream`: field text as the LM writes it (the serving adapter, a
  speed-up on DSPy's internals, lives in `mlflow_dspy.internals`);
* `scoring`: a program scored on a set of examples with `dspy.Evaluate`.

The gateway, batch scoring and eval all use this room; it imports only from
`program` and `lm_engine`.
"""
