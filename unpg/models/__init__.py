"""Face-recognition backbones behind one registry.

``build_backbone('iresnet100', embedding_size=512)`` builds a model whose
``forward(x [N, 3, 112, 112] float) -> emb [N, D]`` returns unnormalised float32 embeddings
(the margin-softmax loss normalises them). Importing the model modules registers them.
"""
from . import iresnet, mobilefacenet  # noqa: F401  (import side effect: registration)
from .registry import build_backbone, list_models, register_model

__all__ = ["build_backbone", "list_models", "register_model"]
