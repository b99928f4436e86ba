"""Triton kernels (each kernel folder stands alone: it imports torch and triton, never megarch)."""
