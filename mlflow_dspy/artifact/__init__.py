"""A logged model's own files, built back into its program without unpickling anything: the recipe (how to
build it from its code), DSPy's JSON state, the LM and adapter as plain specs, and the loader MLflow's
`python_function` flavor names, so that `mlflow models serve` builds it the same way. Ships inside every
artifact's `code/mlflow_dspy/`, beside `program/` and `lm_engine/`, which are all it imports."""
