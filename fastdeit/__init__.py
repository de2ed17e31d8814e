"""fastdeit: a fast, faithful trainer for DeiT (Touvron et al., 2020)."""

__version__ = "0.1.0"
