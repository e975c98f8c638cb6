"""Sparsity-aware context parallelism: head all-to-all, selective key/value exchange, planner."""
