"""LAP, Local Attention Pooling (paper 02, notebook 02)."""
