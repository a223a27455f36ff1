"""Neurite-style Keras 3 layers, written with ``keras.ops``/``keras.random`` only.

They run on the TensorFlow, JAX and PyTorch backends. Spatial tensors are channels-last
``(batch, X, Y, Z, C)``; displacement fields are in voxels.
"""

from .intensity import (GaussianBlur, GMMPainter, MinMaxNormalize, OneHot, RandomBiasField,
                        RandomFieldOfView, RandomGamma, RandomNoise, RemapLabels)
from .resolution import RandomResolution, downup_matrix
from .spatial import (IntegrateVelocity, RandomAffine, RandomVelocityField, ResizeField,
                      SpatialTransformer, affine_coordinates, jacobian_determinant)
from .utils import apply_axis_matrices, resize_field, sample, volume_grid

__all__ = ['GaussianBlur', 'GMMPainter', 'MinMaxNormalize', 'OneHot', 'RandomBiasField',
           'RandomFieldOfView', 'RandomGamma', 'RandomNoise', 'RemapLabels', 'RandomResolution', 'downup_matrix',
           'IntegrateVelocity', 'RandomAffine', 'RandomVelocityField', 'ResizeField',
           'SpatialTransformer', 'affine_coordinates', 'jacobian_determinant',
           'apply_axis_matrices', 'resize_field', 'sample', 'volume_grid']
