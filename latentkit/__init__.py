"""latentkit: train and compare latent-reasoning methods for vision-language models."""

__version__ = "0.1.0"
