"""Data sources and preprocessing."""
