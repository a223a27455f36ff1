"""Generator variants used by the other models' training: registration pairs, signed distance
targets, partial fields of view."""

import keras
import numpy as np

from synthkit import generator as g
from synthkit.models.synthmorph.task import registration_pair
from synthkit.models.synthstrip.task import brain_labels, signed_distance


def _cube(n=20, lo=5, hi=15, label=2):
    lab = np.zeros((n, n, n), np.int32)
    lab[lo:hi, lo:hi, lo:hi] = label
    return lab


def test_signed_distance_sign_and_magnitude():
    sdt = signed_distance(_cube(), [2])
    assert sdt[10, 10, 10] < 0 < sdt[0, 10, 10]            # negative inside, positive outside
    assert abs(sdt[5, 10, 10]) == abs(sdt[4, 10, 10]) == 0.5   # boundary between two voxels
    assert sdt[0, 10, 10] == 4.5                             # 5 voxels from the face, 1 mm
    assert signed_distance(_cube(), [2], voxsize_mm=2.0)[0, 10, 10] == 9.0
    assert np.abs(signed_distance(_cube(), [2], clip_mm=2)).max() == 2


def test_brain_labels_with_and_without_csf():
    assert 24 in brain_labels(True) and 24 not in brain_labels(False)
    assert {2, 3, 41, 42, 17, 53}.issubset(brain_labels(False))
    assert not {502, 506, 0}.intersection(brain_labels(True))   # skull, scalp, background


def test_registration_pair_differs_but_shares_anatomy():
    lab = np.zeros((1, 40, 40, 40, 1), np.int32)
    lab[0, 8:32, 8:32, 8:32, 0] = 2
    lab[0, 14:26, 14:26, 14:26, 0] = 17
    params = g.GeneratorParams(nonlin_std_mm=2.0, resolution_prob=0.0, flip_prob=0.0,
                               translation_range_mm=(0, 0))
    sampler = g.PairSampler(g.SynthGenerator((32, 32, 32), params, seed=2), seed=2)
    moving, fixed = registration_pair(sampler, lab)
    assert not np.allclose(np.asarray(moving['image']), np.asarray(fixed['image']))
    for out in (moving, fixed):
        assert set(np.unique(np.asarray(out['labels']))) == {0, 2, 17}


def test_random_field_of_view_cuts_slabs_from_the_sides():
    from synthkit import layers
    ref = keras.ops.zeros((8, 20, 20, 20, 1))
    always = np.asarray(layers.RandomFieldOfView(prob=1.0, max_fraction=0.3, seed=1)(ref))
    assert set(np.unique(always)) <= {0.0, 1.0}
    for m in always[..., 0]:
        kept = np.argwhere(m > 0)
        lo, hi = kept.min(0), kept.max(0)
        assert np.all(lo <= 6) and np.all(hi >= 13)       # at most 30 % cut from each side
        assert m[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].all()   # one box kept
    assert always.mean() < 0.9
    never = np.asarray(layers.RandomFieldOfView(prob=0.0, seed=1)(ref))
    assert never.min() == 1.0


def test_generator_fov_blanks_image_and_labels_together():
    lab = np.full((1, 40, 40, 40, 1), 3, np.int32)
    params = g.GeneratorParams(fov_prob=1.0, fov_max_fraction=0.4, nonlin_std_mm=0,
                               resolution_prob=0, flip_prob=0, translation_range_mm=(0, 0),
                               mean_range=(50, 200), std_range=(1, 2))
    out = g.PairSampler(g.SynthGenerator((32, 32, 32), params, seed=4), seed=4)(lab)
    image, labels = np.asarray(out['image'])[0, ..., 0], np.asarray(out['labels'])[0, ..., 0]
    assert (labels == 0).any() and np.all(image[labels == 0] == 0)
