"""The `cape` command groups, one module each; thin over the SDK."""
