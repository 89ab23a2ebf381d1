"""saejax: sparse autoencoders on language-model activations, sharded over a device mesh."""

__version__ = "0.1.0"
