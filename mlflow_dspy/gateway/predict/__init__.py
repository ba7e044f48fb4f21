"""The typed `/predict` and `/predict/stream`: the program's own fields (shape.py) and the service."""
