"""Triton kernels (each file stands alone: it imports torch and triton, never megarch)."""
