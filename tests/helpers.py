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
