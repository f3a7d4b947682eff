"""Models: torchvision backbones sized for small images, local weight loading, activation hooks, the
named layers of each architecture (anatomy) and model transforms (surgery)."""
