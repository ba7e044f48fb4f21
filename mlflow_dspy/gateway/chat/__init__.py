"""Chat completions (`POST /v1/chat/completions`): the wire (wire.py) and the service that answers it (service.py)."""
