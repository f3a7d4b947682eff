"""Models: torchvision backbones sized for small images, local weight loading, activation hooks."""
