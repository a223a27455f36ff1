"""Label tables: aseg numbers, names, colours, left/right pairs and generation mappings.

Numbers follow FreeSurfer's ``FreeSurferColorLUT.txt``. The training label maps carry
*generation* labels (brain structures plus extra-cerebral tissue); networks predict the 33
SynthSeg *output* labels (background, 31 brain structures and CSF). The tables here are written
out in code; ``tests/test_labels.py`` cross-checks them against the released ``label_tables``
when ``../shared/data`` is present.
"""

import numpy as np

# label: (name, (r, g, b)) -- names and colours as in FreeSurferColorLUT.txt
LUT = {
    0: ('Unknown', (0, 0, 0)),
    2: ('Left-Cerebral-White-Matter', (245, 245, 245)),
    3: ('Left-Cerebral-Cortex', (205, 62, 78)),
    4: ('Left-Lateral-Ventricle', (120, 18, 134)),
    5: ('Left-Inf-Lat-Vent', (196, 58, 250)),
    7: ('Left-Cerebellum-White-Matter', (220, 248, 164)),
    8: ('Left-Cerebellum-Cortex', (230, 148, 34)),
    10: ('Left-Thalamus', (0, 118, 14)),
    11: ('Left-Caudate', (122, 186, 220)),
    12: ('Left-Putamen', (236, 13, 176)),
    13: ('Left-Pallidum', (12, 48, 255)),
    14: ('3rd-Ventricle', (204, 182, 142)),
    15: ('4th-Ventricle', (42, 204, 164)),
    16: ('Brain-Stem', (119, 159, 176)),
    17: ('Left-Hippocampus', (220, 216, 20)),
    18: ('Left-Amygdala', (103, 255, 255)),
    24: ('CSF', (60, 60, 60)),
    25: ('Left-Lesion', (255, 165, 0)),
    26: ('Left-Accumbens-area', (255, 165, 0)),
    28: ('Left-VentralDC', (165, 42, 42)),
    30: ('Left-vessel', (160, 32, 240)),
    31: ('Left-choroid-plexus', (0, 200, 200)),
    41: ('Right-Cerebral-White-Matter', (245, 245, 245)),
    42: ('Right-Cerebral-Cortex', (205, 62, 78)),
    43: ('Right-Lateral-Ventricle', (120, 18, 134)),
    44: ('Right-Inf-Lat-Vent', (196, 58, 250)),
    46: ('Right-Cerebellum-White-Matter', (220, 248, 164)),
    47: ('Right-Cerebellum-Cortex', (230, 148, 34)),
    49: ('Right-Thalamus', (0, 118, 14)),
    50: ('Right-Caudate', (122, 186, 220)),
    51: ('Right-Putamen', (236, 13, 176)),
    52: ('Right-Pallidum', (13, 48, 255)),
    53: ('Right-Hippocampus', (220, 216, 20)),
    54: ('Right-Amygdala', (103, 255, 255)),
    57: ('Right-Lesion', (255, 165, 0)),
    58: ('Right-Accumbens-area', (255, 165, 0)),
    60: ('Right-VentralDC', (165, 42, 42)),
    62: ('Right-vessel', (160, 32, 240)),
    63: ('Right-choroid-plexus', (0, 200, 221)),
    72: ('5th-Ventricle', (120, 190, 150)),
    85: ('Optic-Chiasm', (234, 169, 30)),
    136: ('Left-choroid-plexus-gen', (0, 200, 200)),
    137: ('Left-Inf-Lat-Vent-gen', (196, 58, 250)),
    163: ('Right-choroid-plexus-gen', (0, 200, 221)),
    164: ('Right-Inf-Lat-Vent-gen', (196, 58, 250)),
    502: ('extracerebral-502', (146, 62, 163)),
    506: ('extracerebral-506', (255, 228, 196)),
    507: ('extracerebral-507', (155, 155, 155)),
    508: ('extracerebral-508', (90, 90, 200)),
    509: ('extracerebral-509', (200, 90, 90)),
    511: ('extracerebral-511', (90, 200, 90)),
    512: ('extracerebral-512', (210, 180, 140)),
    514: ('extracerebral-514', (160, 82, 45)),
    515: ('extracerebral-515', (255, 218, 185)),
    516: ('extracerebral-516', (127, 127, 127)),
    530: ('extracerebral-530', (200, 200, 60)),
}

#: The Desikan-Killiany cortical parcels (FreeSurfer's aparc, without 'unknown' and the
#: corpus callosum, 1000/1004): name and colour, as FreeSurferColorLUT.txt writes them for
#: ``1000 + k`` (ctx-lh-NAME) and ``2000 + k`` (ctx-rh-NAME).
PARCELS = {
    1: ('bankssts', (25, 100, 40)), 2: ('caudalanteriorcingulate', (125, 100, 160)),
    3: ('caudalmiddlefrontal', (100, 25, 0)), 5: ('cuneus', (220, 20, 100)),
    6: ('entorhinal', (220, 20, 10)), 7: ('fusiform', (180, 220, 140)),
    8: ('inferiorparietal', (220, 60, 220)), 9: ('inferiortemporal', (180, 40, 120)),
    10: ('isthmuscingulate', (140, 20, 140)), 11: ('lateraloccipital', (20, 30, 140)),
    12: ('lateralorbitofrontal', (35, 75, 50)), 13: ('lingual', (225, 140, 140)),
    14: ('medialorbitofrontal', (200, 35, 75)), 15: ('middletemporal', (160, 100, 50)),
    16: ('parahippocampal', (20, 220, 60)), 17: ('paracentral', (60, 220, 60)),
    18: ('parsopercularis', (220, 180, 140)), 19: ('parsorbitalis', (20, 100, 50)),
    20: ('parstriangularis', (220, 60, 20)), 21: ('pericalcarine', (120, 100, 60)),
    22: ('postcentral', (220, 20, 20)), 23: ('posteriorcingulate', (220, 180, 220)),
    24: ('precentral', (60, 20, 220)), 25: ('precuneus', (160, 140, 180)),
    26: ('rostralanteriorcingulate', (80, 20, 140)), 27: ('rostralmiddlefrontal', (75, 50, 125)),
    28: ('superiorfrontal', (20, 220, 160)), 29: ('superiorparietal', (20, 180, 140)),
    30: ('superiortemporal', (140, 220, 220)), 31: ('supramarginal', (80, 160, 20)),
    32: ('frontalpole', (100, 0, 100)), 33: ('temporalpole', (70, 70, 70)),
    34: ('transversetemporal', (150, 150, 200)), 35: ('insula', (255, 192, 32))}

#: The 68 parcel labels, left hemisphere first (the order of the parcellation channels).
PARCEL_LABELS = tuple(1000 + k for k in sorted(PARCELS)) + tuple(2000 + k for k in sorted(PARCELS))

for _k, (_name, _rgb) in PARCELS.items():
    LUT[1000 + _k] = ('ctx-lh-' + _name, _rgb)
    LUT[2000 + _k] = ('ctx-rh-' + _name, _rgb)

#: The 33 output labels of mri_synthseg (aseg numbering), in the order of the network's channels.
SEGMENTATION_LABELS = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                       41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)

#: The generation labels found in the released training label maps.
GENERATION_LABELS = (0, 14, 15, 16, 24, 72, 85, 502, 506, 507, 508, 509, 511, 512, 514, 515,
                     516, 530, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136,
                     137, 41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163,
                     164)

#: generation label -> output label, where they differ (every other label maps to itself if it
#: is an output label, else to background).
_GENERATION_TO_OUTPUT_SPECIAL = {25: 2, 57: 41, 136: 4, 137: 5, 163: 43, 164: 44}

#: Left/right pairs (left, right) of every lateralized label we know.
LR_PAIRS = ((2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51),
            (13, 52), (17, 53), (18, 54), (25, 57), (26, 58), (28, 60), (30, 62), (31, 63),
            (136, 163), (137, 164))

#: Labels that make up the brain (for skull stripping and intracranial volume); CSF is added
#: unless a tool asks for the brain without extracerebral CSF.
BRAIN_LABELS = tuple(sorted(set(SEGMENTATION_LABELS) - {0, 24}
                            | {25, 57, 30, 62, 31, 63, 72, 85, 136, 137, 163, 164}))

#: Topological class of each output label: structures of one class touch each other, so
#: post-processing keeps the largest connected component per class (after SynthSeg). 0: none.
TOPOLOGY_CLASSES = {14: 1, 15: 2, 16: 3, 2: 4, 3: 4, 4: 4, 5: 4, 7: 5, 8: 5, 10: 6, 11: 7, 12: 8,
                    13: 9, 17: 10, 18: 11, 26: 12, 28: 13, 41: 14, 42: 14, 43: 14, 44: 14, 46: 15,
                    47: 15, 49: 16, 50: 17, 51: 18, 52: 19, 53: 20, 54: 21, 58: 22, 60: 23}

#: Structure names used in mri_synthseg's volume CSV (as FreeSurfer's SynthSeg writes them).
SYNTHSEG_NAMES = {
    0: 'background', 2: 'left cerebral white matter', 3: 'left cerebral cortex',
    4: 'left lateral ventricle', 5: 'left inferior lateral ventricle',
    7: 'left cerebellum white matter', 8: 'left cerebellum cortex', 10: 'left thalamus',
    11: 'left caudate', 12: 'left putamen', 13: 'left pallidum', 14: '3rd ventricle',
    15: '4th ventricle', 16: 'brain-stem', 17: 'left hippocampus', 18: 'left amygdala',
    24: 'csf', 26: 'left accumbens area', 28: 'left ventral DC',
    41: 'right cerebral white matter', 42: 'right cerebral cortex', 43: 'right lateral ventricle',
    44: 'right inferior lateral ventricle', 46: 'right cerebellum white matter',
    47: 'right cerebellum cortex', 49: 'right thalamus', 50: 'right caudate',
    51: 'right putamen', 52: 'right pallidum', 53: 'right hippocampus', 54: 'right amygdala',
    58: 'right accumbens area', 60: 'right ventral DC'}

#: Structure groups for --qc scores (name, member output labels), after SynthSeg's QC groups.
QC_GROUPS = (
    ('general white matter', (2, 41, 7, 46, 16, 28, 60)),
    ('general grey matter', (3, 42, 8, 47)),
    ('general csf', (4, 5, 43, 44, 14, 15, 24)),
    ('cerebellum', (7, 8, 46, 47)),
    ('brainstem', (16,)),
    ('thalamus', (10, 49)),
    ('putamen+pallidum', (12, 13, 51, 52)),
    ('hippocampus+amygdala', (17, 18, 53, 54)),
)


def name(label):
    """FreeSurfer name of ``label`` (``'label-N'`` when unknown)."""
    return LUT.get(int(label), ('label-%d' % label, None))[0]


def color(label):
    """RGB colour of ``label``; unknown labels get a fixed pseudo-random colour."""
    entry = LUT.get(int(label))
    if entry is not None:
        return entry[1]
    rng = np.random.default_rng(int(label))
    return tuple(int(c) for c in rng.integers(40, 256, size=3))


def lr_swap_table(labels):
    """Index permutation that swaps left and right labels within the sequence ``labels``.

    ``onehot[..., lr_swap_table(labels)]`` swaps the channels of a one-hot/posterior map whose
    channels follow ``labels``.
    """
    labels = [int(x) for x in labels]
    swap = {}
    for left, right in LR_PAIRS + tuple((1000 + k, 2000 + k) for k in PARCELS):
        swap[left], swap[right] = right, left
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index.get(swap.get(lab, lab), i) for i, lab in enumerate(labels)])


def lr_swap_lookup(max_label=1024):
    """Array ``a`` with ``a[label]`` the label of the opposite hemisphere (identity otherwise)."""
    table = np.arange(max_label, dtype=np.int32)
    for left, right in LR_PAIRS:
        table[left], table[right] = right, left
    return table


def generation_to_output(label):
    """Output (segmentation) label of a generation label."""
    label = int(label)
    if label in _GENERATION_TO_OUTPUT_SPECIAL:
        return _GENERATION_TO_OUTPUT_SPECIAL[label]
    return label if label in SEGMENTATION_LABELS else 0


def generation_lookup(out_labels=SEGMENTATION_LABELS, max_label=1024):
    """Array mapping any generation label to the *channel index* of its output label."""
    index = {lab: i for i, lab in enumerate(out_labels)}
    table = np.zeros(max_label, dtype=np.int32)
    for lab in range(max_label):
        table[lab] = index.get(generation_to_output(lab), 0)
    return table


def color_table(labels=None):
    """``{label: (name, (r, g, b))}`` for ``labels`` (all known labels by default): the colour
    table :func:`synthkit.io.save_volume` embeds in mgz outputs, without importing surfa (0.2 s
    of every mri_synthseg run)."""
    return {int(lab): (name(lab), tuple(int(c) for c in color(lab)))
            for lab in (sorted(LUT) if labels is None else labels)}


def surfa_lookup(labels=None):
    """A ``surfa.LabelLookup`` for ``labels`` (all known labels by default), to embed in mgz."""
    import surfa as sf
    lut = sf.labels.LabelLookup()
    for lab in (sorted(LUT) if labels is None else labels):
        lut[int(lab)] = (name(lab), list(color(lab)))
    return lut
