"""Training: advantages, losses, off-policy correction (pure math) and, later, the train loop."""
