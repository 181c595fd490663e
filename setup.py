"""Installs the pure-Python package; the CUDA extension (csrc/) is added by the CUDA-backend work."""
from setuptools import setup

setup()
