"""The benchmark: servers side by side against a stub LM with a fixed latency (make bench)."""
