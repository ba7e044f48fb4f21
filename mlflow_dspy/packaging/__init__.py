"""Packaging: log a program as an MLflow model, register and describe its versions."""
