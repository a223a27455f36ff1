"""SynthKit: FreeSurfer-style brain MRI tools whose networks learn only from synthetic images."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.1.0'
