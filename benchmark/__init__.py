"""bench.py's rows and its transformers peer."""
