"""Tiny models and processors built from configs: for tests, CPU recipes and the demo (no downloads)."""
