"""SynthKit: FreeSurfer-style brain MRI tools whose networks learn only from synthetic images."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# oneDNN convolutions: TensorFlow turns them on by default only on some Intel CPUs; on this
# project's AMD machines they make 3-D convolutions about 4x faster (a 96^3 U-Net training step
# 5.8 s instead of 22 s). Set TF_ENABLE_ONEDNN_OPTS=0 to compare with the plain kernels.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')

__version__ = '0.1.0'
