"""Thin process entry points for trainers, recorders and evaluators (each a `main()`)."""
