"""Shim for tools that still call setup.py; the configuration lives in
pyproject.toml (including the kernels/ -> fused_lora.kernels mapping)."""

from setuptools import setup

setup()
