"""megarch: train and compare transformer language-model architectures and objectives."""

__version__ = "0.1.0"
