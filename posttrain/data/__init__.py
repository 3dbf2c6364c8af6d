"""Data: records, loading, adapters, mixing, chat formatting and packing."""
