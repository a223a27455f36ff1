"""Small geometry helpers shared by the tests (imported as ``helpers``: pytest puts this folder
on the path)."""

import numpy as np


def rotation(deg_z=0.0, deg_x=0.0, deg_y=0.0):
    """3x3 rotation ``Rz @ Rx @ Ry`` (degrees, right-handed)."""
    az, ax, ay = np.deg2rad([deg_z, deg_x, deg_y])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rz @ rx @ ry


def make_affine(linear, translation=(0.0, 0.0, 0.0)):
    """4x4 matrix from a 3x3 linear part and a translation."""
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = translation
    return aff


def seeded(model, seed=0):
    """Re-initialize ``model``'s kernels and biases with their own initializers, seeded (one
    seed per weight from ``seed``): random-weight test networks must not depend on the global
    Keras random state that the tests before them left (pytest-randomly orders them
    differently every run). Returns the model."""
    n = 0
    for layer in model._flatten_layers(include_self=False):
        for attr in ('kernel', 'bias'):
            var = getattr(layer, attr, None)
            init = getattr(layer, attr + '_initializer', None)
            if var is None or init is None:
                continue
            config = init.get_config()
            if 'seed' in config:
                config['seed'] = seed * 1000 + n
                n += 1
            var.assign(type(init).from_config(config)(tuple(var.shape), dtype=var.dtype))
    return model
