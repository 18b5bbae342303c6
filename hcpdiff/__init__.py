"""hcpdiff: a YAML-config-driven trainer for text-to-image diffusion models."""

__version__ = "0.1.0"
