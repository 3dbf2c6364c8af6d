"""Retrieval-augmented generation: the passage datastore (index.py)."""
