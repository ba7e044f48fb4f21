"""The bundled example programs: `qa`, `assistant`, `rag` and `classify`.

Each is an ordinary program file, declared in `pyproject.toml` beside it under
`[tool.mlflow-dspy.programs]`, exactly as a user's project declares its own:
`mlflow-dspy log qa` goes through the same path as `mlflow-dspy log triage`.
Their train and dev sets are in `data/<name>/`. Installed, this folder ships
inside the package as `mlflow_dspy/examples/`.
"""
