"""DSPy programs as DSPy's own tutorials teach people to write them (not this project's examples): the
yardstick every kind of program must meet, logged, served, streamed, evaluated and optimized."""
