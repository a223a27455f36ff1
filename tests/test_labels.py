"""synthkit.labels: the tables are consistent with each other and with the released label tables."""

from pathlib import Path

import numpy as np
import pytest

from synthkit import labels

TABLES = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'label_tables'


def test_33_segmentation_labels_all_named():
    seg = labels.SEGMENTATION_LABELS
    assert len(seg) == 33 and len(set(seg)) == 33 and seg[0] == 0
    assert 24 in seg  # CSF is an output label, as in SynthSeg 2.0
    assert all(lab in labels.LUT for lab in seg)
    assert labels.name(17) == 'Left-Hippocampus' and labels.name(53) == 'Right-Hippocampus'
    assert labels.name(9999) == 'label-9999'


def test_every_generation_label_maps_to_an_output_label():
    assert len(set(labels.GENERATION_LABELS)) == len(labels.GENERATION_LABELS)
    for lab in labels.GENERATION_LABELS:
        assert labels.generation_to_output(lab) in labels.SEGMENTATION_LABELS, lab
        assert lab in labels.LUT, lab
    # output labels map to themselves; lesions and generation-only splits to their parents
    for lab in labels.SEGMENTATION_LABELS:
        assert labels.generation_to_output(lab) == lab
    assert labels.generation_to_output(25) == 2 and labels.generation_to_output(57) == 41
    assert labels.generation_to_output(136) == 4 and labels.generation_to_output(164) == 44
    assert labels.generation_to_output(507) == 0 and labels.generation_to_output(30) == 0


def test_generation_lookup_gives_channel_indices():
    table = labels.generation_lookup()
    seg = labels.SEGMENTATION_LABELS
    for lab in labels.GENERATION_LABELS:
        assert seg[table[lab]] == labels.generation_to_output(lab)
    assert table[999] == 0


def test_lr_swap_table_is_an_involution_that_swaps_hemispheres():
    seg = labels.SEGMENTATION_LABELS
    swap = labels.lr_swap_table(seg)
    assert sorted(swap) == list(range(len(seg)))  # a permutation
    assert np.array_equal(swap[swap], np.arange(len(seg)))  # an involution
    assert seg[swap[seg.index(2)]] == 41 and seg[swap[seg.index(41)]] == 2
    for lab in (0, 14, 15, 16, 24):  # midline structures stay put
        assert seg[swap[seg.index(lab)]] == lab
    onehot = np.eye(len(seg))[None]  # channel c is label seg[c]
    flipped = onehot[..., swap]
    assert flipped[0, seg.index(2), seg.index(41)] == 1

    lookup = labels.lr_swap_lookup()
    for lab in range(1024):
        assert lookup[lookup[lab]] == lab


def test_lr_pairs_are_known_and_consistent():
    lefts = [left for left, _ in labels.LR_PAIRS]
    rights = [right for _, right in labels.LR_PAIRS]
    assert len(set(lefts + rights)) == 2 * len(labels.LR_PAIRS)
    for left, right in labels.LR_PAIRS:
        assert left in labels.LUT and right in labels.LUT, (left, right)
        left_name, right_name = labels.name(left), labels.name(right)
        assert 'Left' in left_name and 'Right' in right_name, (left_name, right_name)
        assert left_name.replace('Left', 'Right') == right_name
    # the output labels are closed under the swap
    seg = set(labels.SEGMENTATION_LABELS)
    lookup = labels.lr_swap_lookup()
    assert {int(lookup[lab]) for lab in seg} == seg


def test_color_table_is_the_surfa_lookup_as_a_dict():
    table = labels.color_table([0, 2, 41, 1001])
    lut = labels.surfa_lookup([0, 2, 41, 1001])
    assert sorted(table) == sorted(lut) == [0, 2, 41, 1001]
    for k, (name, rgb) in table.items():
        assert name == lut[k].name
        assert rgb == tuple(int(c) for c in lut[k].color[:3])
    assert table[2][0] == 'Left-Cerebral-White-Matter' and table[41][1] == (245, 245, 245)
    assert len(labels.color_table()) == len(labels.LUT)


def test_surfa_lookup_names_and_colours():
    lut = labels.surfa_lookup([0, 2, 41])
    assert sorted(lut) == [0, 2, 41]
    assert lut[2].name == 'Left-Cerebral-White-Matter'
    assert tuple(int(c) for c in lut[41].color[:3]) == (245, 245, 245)


@pytest.mark.skipif(not TABLES.is_dir(), reason='released label tables (../shared/data) missing')
def test_tables_match_released_label_tables():
    generation = np.load(TABLES / 'generation_labels.npy')
    segmentation = np.load(TABLES / 'synthseg_segmentation_labels.npy')  # aligned, SynthSeg 1.0
    assert set(generation.tolist()) == set(labels.GENERATION_LABELS)
    assert len(generation) == len(segmentation)
    disagree = {int(g): (int(s), labels.generation_to_output(g))
                for g, s in zip(generation, segmentation)
                if labels.generation_to_output(g) != s}
    # the only difference: SynthSeg 1.0 maps CSF to background, we keep it (as SynthSeg 2.0)
    assert disagree == {24: (0, 24)}


def test_parcels_pair_hemispheres_and_swap():
    assert len(labels.PARCEL_LABELS) == 68
    assert 1004 not in labels.PARCEL_LABELS and 2004 not in labels.PARCEL_LABELS
    chans = [0, 3, 42] + list(labels.PARCEL_LABELS)
    perm = labels.lr_swap_table(chans)
    swapped = [chans[i] for i in perm]
    assert swapped[:3] == [0, 42, 3]
    assert swapped[3:] == list(labels.PARCEL_LABELS[34:]) + list(labels.PARCEL_LABELS[:34])
    assert labels.name(1035) == 'ctx-lh-insula' and labels.name(2001) == 'ctx-rh-bankssts'


@pytest.mark.skipif(not TABLES.is_dir(), reason='released label tables (../shared/data) missing')
def test_parcels_match_released_parcellation_table():
    released = np.load(TABLES / 'synthseg_parcellation_labels.npy').tolist()
    names = np.load(TABLES / 'synthseg_parcellation_names.npy').tolist()
    assert released == [0] + list(labels.PARCEL_LABELS)
    assert [labels.name(k) for k in released[1:]] == names[1:]
