"""Worked examples that need no download (scikit-learn's bundled datasets)."""
