"""Runnable examples: ``python -m monim.model_client.examples.train --help``."""
