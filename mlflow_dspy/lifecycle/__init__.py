"""Layer 5: the lifecycle commands: eval, optimize (a new version from a compiled program), init."""
