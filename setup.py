"""Build of the optional C kernel (kdstore/_native.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package still installs and the reader uses its
numpy path (same results, about 2x slower; ``kd store info`` and ``bench/reader_bench.py``
say which path runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kdstore._native", ["kdstore/_native.c"], optional=True)])
