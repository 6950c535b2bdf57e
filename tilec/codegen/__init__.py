"""Codegen: fused groups + schedule -> one persistent Triton kernel (Jinja templates)."""
