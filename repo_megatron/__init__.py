"""repo-megatron: RePO (Rephrasing Policy Optimization) post-training on Megatron-Core."""

__version__ = "0.1.0"
