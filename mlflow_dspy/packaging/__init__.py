"""Layer 4: a program as an MLflow model.

* `log`: log a program with its code, data score and pins, and register a version;
* `load`: load a logged chat model (checked against its SHA-256) into a runtime host;
* `promote`: move an alias to a version that scores at least as well;
* `integrity`, `redact`: SHA-256 before unpickling; no credentials in what is pickled;
* `requirements`, `paths`, `uris`: the pins, where the store is, the one model-URI parser;
* `serve`, `docker`: `mlflow models serve` and container images of a logged model.
"""
