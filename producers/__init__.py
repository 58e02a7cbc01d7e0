"""Thin process entry points for rollout producers and the prompt feeder (each a `main()`)."""
