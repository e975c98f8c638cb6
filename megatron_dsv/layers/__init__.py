"""Megatron-facing modules: core attention, predictor, profiler."""
