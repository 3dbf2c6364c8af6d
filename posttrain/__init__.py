"""posttrain: an open, reproducible toolkit for the Tulu 3 / OLMo 2 / s1 post-training recipe."""

__version__ = "0.1.0"
