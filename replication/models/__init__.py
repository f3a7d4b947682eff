"""Models: torchvision backbones sized for small images, local weight loading, activation hooks, the
named layers of each architecture (anatomy), model transforms (surgery) and ImageNet-trained networks
loaded offline from pip packages (pretrained)."""
