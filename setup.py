"""Build of the optional C kernel (kdstore/_native.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package still installs and the reader uses its
numpy path (same results, slower: ``bench/reader_bench.py``; ``kd store inspect`` names the
decoder in use). The flags are set here because a user's ``CFLAGS`` replaces Python's
optimisation level (an unoptimised build measured 4.5x slower); ``-funroll-loops``: 12 %
faster per call on the per-entry loops.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-funroll-loops"]
setup(ext_modules=[Extension("kdstore._native", ["kdstore/_native.c"], optional=True, extra_compile_args=flags)])
