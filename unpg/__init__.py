"""UNPG: margin-softmax face recognition with Unified Negative Pair Generation."""
__version__ = "0.1.0"
