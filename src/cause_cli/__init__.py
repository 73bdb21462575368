"""CAUSE (Causal Unsupervised Semantic Segmentation) as a command line toolkit."""

__version__ = "0.1.0"
