"""The off-policy replay buffer (staleness bound, dynamic filters, partial-rollout recycling)."""
