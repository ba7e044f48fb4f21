"""A sample user package: a two-step support-ticket triage program."""
