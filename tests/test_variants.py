"""Generator variants used by the other tools' training: registration pairs, signed distance
targets and random-shapes label maps."""

import keras
import numpy as np

from synthkit import generator as g


def _cube(n=20, lo=5, hi=15, label=2):
    lab = np.zeros((n, n, n), np.int32)
    lab[lo:hi, lo:hi, lo:hi] = label
    return lab


def test_signed_distance_sign_and_magnitude():
    sdt = g.signed_distance(_cube(), [2])
    assert sdt[10, 10, 10] < 0 < sdt[0, 10, 10]            # negative inside, positive outside
    assert abs(sdt[5, 10, 10]) == abs(sdt[4, 10, 10]) == 0.5   # boundary between two voxels
    assert sdt[0, 10, 10] == 4.5                             # 5 voxels from the face, 1 mm
    assert g.signed_distance(_cube(), [2], voxsize_mm=2.0)[0, 10, 10] == 9.0
    assert np.abs(g.signed_distance(_cube(), [2], clip_mm=2)).max() == 2


def test_brain_labels_with_and_without_csf():
    assert 24 in g.brain_labels(True) and 24 not in g.brain_labels(False)
    assert {2, 3, 41, 42, 17, 53}.issubset(g.brain_labels(False))
    assert not {502, 506, 0}.intersection(g.brain_labels(True))   # skull, scalp, background


def test_random_shapes_are_smooth_regions_of_every_label():
    shapes = g.RandomShapes((32, 32, 32), n_labels=6, seed=3)
    out = np.asarray(shapes(keras.ops.zeros((2, 1))))
    assert out.shape == (2, 32, 32, 32, 1)
    assert set(np.unique(out)) <= set(range(6)) and np.unique(out[0]).size >= 4
    # smooth regions: neighbouring voxels mostly share a label
    same = (out[0, 1:] == out[0, :-1]).mean()
    assert same > 0.85
    again = np.asarray(g.RandomShapes((32, 32, 32), n_labels=6, seed=3)(keras.ops.zeros((2, 1))))
    assert np.array_equal(out, again)


def test_registration_pair_differs_but_shares_anatomy():
    lab = np.zeros((1, 40, 40, 40, 1), np.int32)
    lab[0, 8:32, 8:32, 8:32, 0] = 2
    lab[0, 14:26, 14:26, 14:26, 0] = 17
    params = g.GeneratorParams(nonlin_std_mm=2.0, resolution_prob=0.0, flip_prob=0.0,
                               translation_range_mm=(0, 0))
    sampler = g.PairSampler(g.SynthGenerator((32, 32, 32), params, seed=2), seed=2)
    moving, fixed = g.registration_pair(sampler, lab)
    assert not np.allclose(np.asarray(moving['image']), np.asarray(fixed['image']))
    for out in (moving, fixed):
        assert set(np.unique(np.asarray(out['labels']))) == {0, 2, 17}
