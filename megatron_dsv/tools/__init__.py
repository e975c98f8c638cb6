"""Command-line tools (``python -m megatron_dsv.tools.<name>``)."""
