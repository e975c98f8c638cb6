"""Video DiT built from megatron-core blocks."""
