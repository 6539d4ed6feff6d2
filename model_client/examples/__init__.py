"""Runnable examples: ``python -m model_client.examples.train --help``."""
