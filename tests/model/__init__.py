"""Tests of megarch.model and the model config."""
