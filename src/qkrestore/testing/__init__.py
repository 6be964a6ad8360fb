"""Tiny random models from transformers' config classes, for the demo and the tests."""
