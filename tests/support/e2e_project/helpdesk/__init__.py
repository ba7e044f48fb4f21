"""A user's own package, as a test fixture: the tool must ship it without knowing it."""
