"""Analysis: Network Dissection, basis rotations."""
