"""Each replicated paper's method, one module per method, named after what it does."""
