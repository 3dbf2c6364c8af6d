"""Training: one loop (loop.py) shared by every algorithm; each algorithm supplies a loss."""
