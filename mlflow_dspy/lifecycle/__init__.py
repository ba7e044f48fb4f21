"""Model lifecycle: evaluate on the dev set, optimize, promote between versions."""
