"""autointerp: label the features of sparse autoencoders across training checkpoints."""

__version__ = "0.1.0"
