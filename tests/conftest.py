"""Shared test helpers: run against the source tree and give each test a scratch folder."""

import os
import sys
from pathlib import Path

import pytest

_SRC = str(Path(__file__).resolve().parents[1] / 'python')
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# the networks in float32 on every machine (the default, 'auto', is bfloat16 where the CPU has
# it): the same numbers whichever machine runs the tests; tests of bfloat16 ask for it
os.environ.setdefault('SYNTHKIT_PRECISION', 'float32')


@pytest.fixture
def tmp(tmp_path):
    """A fresh scratch folder as a ``str`` (for APIs that build paths with ``os.path``)."""
    return str(tmp_path)
