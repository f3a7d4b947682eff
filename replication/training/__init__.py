"""Training: one loop for every notebook, with pluggable loss terms, checkpoints and a cache."""
