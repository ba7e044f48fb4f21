"""The Responses API (`POST /v1/responses`): the wire (wire.py), its event stream (events.py) and its service."""
