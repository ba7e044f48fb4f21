"""`/invocations`: what `mlflow models serve` answers, in every input format it takes."""
