"""mri_synthseg: inference helpers and the command line, with a tiny untrained model so the
tests need no shipped weights and no data."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import geometry, io, metrics, nets, predict
from synthkit import labels as lab
from synthkit.models.synthseg import cli as synthseg
from synthkit.models.synthseg import inference

LABELS = lab.SEGMENTATION_LABELS


@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory):
    """A 2-level, 4-feature U-Net with a model card, as the tools expect to find it."""
    folder = tmp_path_factory.mktemp('models')
    cfg = nets.UNetConfig(features=4, levels=2, convs_per_level=1)
    model = seeded(nets.unet(cfg), 3)
    model.save_weights(str(folder / 'synthseg.weights.h5'))
    card = {'task': 'synthseg', 'architecture': {'type': 'unet', **cfg.to_dict()},
            'output_labels': list(LABELS),
            'input': {'voxsize_mm': 1.0}, 'training': {'steps': 0}}
    (folder / 'synthseg.json').write_text(json.dumps(card))
    return folder


@pytest.fixture
def models_env(tiny_model_dir, monkeypatch):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(tiny_model_dir))
    return tiny_model_dir


def _phantom(path, shape=(30, 34, 28), voxsize=(1.0, 1.0, 1.2)):
    """A bright ellipsoid 'brain' in a dark background, RAS affine."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    data = np.where((grid ** 2).sum(0) < 0.6, 100.0, 10.0).astype(np.float32)
    data += np.random.default_rng(0).normal(0, 2, shape).astype(np.float32)
    affine = np.diag(list(voxsize) + [1.0])
    affine[:3, 3] = [-10, 5, 3]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


class ConstModel:
    """Stand-in network: channel k's probability is a fixed function of position."""
    output_shape = (None, None, None, None, 3)

    def predict_on_batch(self, x):
        x = np.asarray(x)[0, ..., 0]
        p = np.stack([1 - x, x * 0.5, x * 0.5], -1)
        return p[None]


class ChannelModel:
    """Stand-in network of 3 input channels: x0 + 2 x1 (pointwise)."""
    output_shape = (None, None, None, None, 1)

    def predict_on_batch(self, x):
        x = np.asarray(x)
        return x[..., :1] + 2 * x[..., 1:2]


def test_predict_tiled_takes_input_channels_and_permutes_them_when_mirrored():
    x = np.random.default_rng(2).random((32, 24, 16, 3)).astype(np.float32)
    tiled = predict.predict_tiled(ChannelModel(), x, tile=16, overlap=8, divisor=8)
    np.testing.assert_allclose(tiled[..., 0], x[..., 0] + 2 * x[..., 1], atol=1e-5)
    # mirrored with channels 1 and 2 swapped: the average of x0 + 2 x1 and x0 + 2 x2
    both = predict.predict_tiled(ChannelModel(), x, tile=16, overlap=8, divisor=8,
                                 flip=(0, [0], [0, 2, 1]))
    np.testing.assert_allclose(both[..., 0], x[..., 0] + x[..., 1] + x[..., 2], atol=1e-5)
    x[..., 0] = 0                      # a zero first channel (no image) is not run
    empty = predict.predict_tiled(ChannelModel(), x, tile=16, overlap=8, divisor=8, empty=[0.5])
    assert np.allclose(empty, 0.5)


def test_predict_tiled_matches_whole_volume_for_pointwise_model():
    x = np.random.default_rng(1).random((48, 40, 32)).astype(np.float32)
    whole = ConstModel().predict_on_batch(x[None, ..., None])[0]
    tiled = predict.predict_tiled(ConstModel(), x, tile=16, overlap=8, divisor=8)
    assert np.allclose(tiled, whole, atol=1e-5)


def test_predict_tiled_skips_empty_tiles_as_background():
    x = np.zeros((32, 32, 32), np.float32)
    x[:16, :16, :16] = 0.7
    out = predict.predict_tiled(ConstModel(), x, tile=16, overlap=0, divisor=8, empty=0)
    assert np.allclose(out[20:, 20:, 20:, 0], 1)           # empty tile: background certain
    assert np.allclose(out[:16, :16, :16, 1], 0.35)         # the model ran where there is data


def test_flip_averaging_swaps_left_right_channels():
    labels = (0, 2, 41)

    class Lateral:
        """Predicts 'left' (label 2) on the low half of axis 0, right elsewhere."""
        output_shape = (None, None, None, None, 3)

        def predict_on_batch(self, x):
            n = x.shape[1]
            p = np.zeros(x.shape[1:4] + (3,), np.float32)
            p[: n // 2, ..., 1] = 1
            p[n // 2:, ..., 2] = 1
            return p[None]

    x = np.ones((16, 8, 8), np.float32)
    out = predict.predict_tiled(Lateral(), x, tile=16, overlap=0, divisor=8,
                                flip=(0, lab.lr_swap_table(labels)))
    # mirrored input, mirrored back, channels swapped: the same anatomy -> the same answer
    assert np.allclose(out[:8, ..., 1], 1) and np.allclose(out[8:, ..., 2], 1)


class NumpyFlip:
    """A model behind a plain ``predict_on_batch``: predict_tiled mirrors its tiles with numpy
    (the path of models that are neither Keras models nor wrappers of one)."""

    def __init__(self, inner):
        self.inner, self.output_shape = inner, inner.output_shape

    def predict_on_batch(self, x):
        return np.asarray(self.inner.predict_on_batch(np.asarray(x, np.float32)))


@pytest.mark.parametrize('wrap', [False, True])
def test_flip_averaging_in_the_graph_matches_numpy_flips(wrap):
    """A Keras model (or an ImageStatistics wrapper of one) is flip-averaged in one compiled
    graph (cast, mirror, channel permutations of input and output inside it), float16 tiles
    going in as they are; the result is the numpy path's."""
    cfg = nets.UNetConfig(in_channels=3, out_channels=3, features=4, levels=2,
                          convs_per_level=1, final_activation='softmax')
    net = seeded(nets.unet(cfg), 5)
    model = nets.ImageStatistics(net) if wrap else net
    x = np.random.default_rng(3).random((32, 24, 16, 3)).astype(np.float32)
    flip = (0, [0, 2, 1], [1, 0, 2])
    fused = predict.predict_tiled(model, x, tile=16, overlap=8, divisor=8, flip=flip)
    assert predict._flip_program(model, flip) is not None
    assert predict._flip_program(NumpyFlip(model), flip) is None
    plain = predict.predict_tiled(NumpyFlip(model), x, tile=16, overlap=8, divisor=8, flip=flip)
    np.testing.assert_allclose(fused, plain, atol=1e-5)
    unflipped = predict.predict_tiled(model, x, tile=16, overlap=8, divisor=8)
    assert np.abs(unflipped - fused).max() > 1e-3           # the mirrored pass counted
    half = predict.predict_tiled(model, x.astype(np.float16), tile=16, overlap=8, divisor=8,
                                 flip=flip)
    np.testing.assert_allclose(half, fused, atol=2e-3)


def test_postprocess_removes_islands_and_renormalizes():
    shape = (24, 24, 24)
    post = np.zeros(shape + (len(LABELS),), np.float32)
    bg, hip = LABELS.index(0), LABELS.index(17)
    post[..., bg] = 1
    post[4:12, 4:12, 4:12, bg], post[4:12, 4:12, 4:12, hip] = 0, 1       # the structure
    post[18:20, 18:20, 18:20, bg], post[18:20, 18:20, 18:20, hip] = 0, 1  # a stray island
    out = inference.postprocess(post, LABELS, smooth_sigma=0)
    seg = inference.hard_segmentation(out, LABELS)
    assert (seg[4:12, 4:12, 4:12] == 17).all()
    assert (seg[18:20, 18:20, 18:20] == 0).all()
    assert np.allclose(out.sum(-1), 1)


def test_volumes_and_qc():
    post = np.zeros((10, 10, 10, len(LABELS)), np.float32)
    post[..., LABELS.index(0)] = 0.5
    post[..., LABELS.index(2)] = 0.5
    vols = inference.volumes(post, LABELS, voxel_volume=2.0)
    assert vols[2] == pytest.approx(1000.0) and vols[0] == pytest.approx(1000.0)
    scores = inference.qc_scores(post, LABELS)
    assert set(scores) == {g for g, _ in lab.QC_GROUPS}
    assert all(0 <= s <= 1 for s in scores.values())


def test_cli_single_file_outputs(tmp_path, models_env, capsys):
    data, affine = _phantom(tmp_path / 'scan.nii.gz')
    out = tmp_path / 'out' / 'scan_seg.mgz'
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(out),
                       '--vol', str(tmp_path / 'vol.csv'), '--qc', str(tmp_path / 'qc.csv'),
                       '--post', str(tmp_path / 'post.nii.gz'),
                       '--resample', str(tmp_path / 'res.nii.gz'), '--png'])
    assert e.value.code == 0, capsys.readouterr().err
    seg = io.load_volume(str(out), allow_empty=True)
    assert geometry.orientation(seg.affine) == 'LIA'
    assert np.allclose(seg.voxsize, 1.0)
    assert set(np.unique(seg.data)) <= set(LABELS)
    assert io.load_lut(str(out))[17][0] == 'Left-Hippocampus'
    post = io.load_volume(str(tmp_path / 'post.nii.gz'))
    assert post.nframes == len(LABELS) and np.allclose(post.data.sum(-1), 1, atol=1e-2)
    res = io.load_volume(str(tmp_path / 'res.nii.gz'))
    assert res.data.max() == pytest.approx(data.max(), rel=0.05)   # original intensities
    rows = list(csv.reader(open(tmp_path / 'vol.csv')))
    assert rows[0][:3] == ['subject', 'total intracranial', 'left cerebral white matter']
    assert rows[1][0] == 'scan' and len(rows[1]) == len(LABELS) + 1
    total = float(rows[1][1])
    assert total == pytest.approx(sum(float(v) for v in rows[1][2:]), rel=1e-4)
    assert os.path.exists(tmp_path / 'out' / 'scan_seg.png')
    assert list(csv.reader(open(tmp_path / 'qc.csv')))[0][1] == 'general white matter'


def test_cli_keepgeom_writes_on_input_grid(tmp_path, models_env):
    data, affine = _phantom(tmp_path / 'scan.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.nii.gz'),
                       '--keepgeom', '--fast'])
    assert e.value.code == 0
    seg = nib.load(str(tmp_path / 's.nii.gz'))
    assert seg.shape == data.shape and np.allclose(seg.affine, affine)


@pytest.mark.parametrize('voxsize', [1.0, 2.0])
def test_cli_posteriors_are_written_slab_by_slab_as_computed_whole(tmp_path, tiny_model_dir,
                                                                  monkeypatch, voxsize):
    """--post goes to its file slab by slab (io.FrameWriter, nothing whole in memory): the same
    values as the in-memory posteriors, on the 1 mm grid and with --keepgeom on the input
    grid, and no temp file left beside the outputs."""
    models = tmp_path / 'models'
    models.mkdir()
    card = json.loads((tiny_model_dir / 'synthseg.json').read_text())
    card['input']['voxsize_mm'] = voxsize          # 2 mm: the slab path of upsample_slabs
    (models / 'synthseg.json').write_text(json.dumps(card))
    os.symlink(tiny_model_dir / 'synthseg.weights.h5', models / 'synthseg.weights.h5')
    monkeypatch.setenv('SYNTHKIT_MODELS', str(models))
    data, affine = _phantom(tmp_path / 'scan.nii.gz', shape=(40, 44, 36))
    out = tmp_path / 'out'
    for extra, post in (([], 'post.mgz'), (['--keepgeom'], 'post_in.nii.gz')):
        with pytest.raises(SystemExit) as e:
            synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(out / 's.mgz'),
                           '--post', str(out / post)] + extra)
        assert e.value.code == 0
    scan = io.load_volume(str(tmp_path / 'scan.nii.gz'))    # the header's float32 affine
    expected = inference.Segmenter().segment(np.asarray(scan.data, np.float32), scan.affine,
                                             keep_posteriors=True)
    got = io.load_volume(str(out / 'post.mgz'))
    assert got.data.shape == expected.posteriors.shape
    assert np.allclose(got.affine, expected.grid.affine)
    np.testing.assert_allclose(got.data, expected.posteriors, atol=1e-6)
    moved = io.load_volume(str(out / 'post_in.nii.gz'))
    assert np.allclose(moved.affine, scan.affine)
    assert moved.data.shape == data.shape + (len(LABELS),)
    np.testing.assert_allclose(
        moved.data, geometry.to_input_grid(expected.posteriors, expected.grid, 'linear'),
        atol=1e-5)
    assert sorted(os.listdir(out)) == ['post.mgz', 'post_in.nii.gz', 's.mgz']


def test_frame_writer_regions_fill_and_failure(tmp_path):
    """Regions of every frame land where they belong in all four formats, unwritten voxels
    take the fill, and a failure inside the context leaves nothing."""
    rng = np.random.default_rng(0)
    x = rng.random((9, 10, 8, 3)).astype(np.float32)
    affine = np.array([[-1., 0, 0, 4], [0, 0, 1, -5], [0, -1, 0, 6], [0, 0, 0, 1]])
    expected = np.zeros_like(x)
    expected[..., 1] = 2.0
    expected[1:8, 2:10] = x[1:8, 2:10]
    for ext in ('.nii', '.nii.gz', '.mgh', '.mgz'):
        path = tmp_path / ('v' + ext)
        with io.FrameWriter(path, x.shape[:3], 3, affine, fill={1: 2.0}) as w:
            for z in range(0, 8, 3):
                w.write((slice(1, 8), slice(2, None), slice(z, z + 3)), x[1:8, 2:10, z:z + 3])
        got = io.load_volume(str(path))
        np.testing.assert_array_equal(got.data, expected)
        assert np.allclose(got.affine, affine)
    with pytest.raises(RuntimeError):
        with io.FrameWriter(tmp_path / 'broken.nii.gz', x.shape[:3], 3, affine) as w:
            w.write_frame(0, x[..., 0])
            raise RuntimeError('interrupted')
    assert sorted(os.listdir(tmp_path)) == ['v.mgh', 'v.mgz', 'v.nii', 'v.nii.gz']


def test_cli_batch_goes_on_past_bad_file(tmp_path, models_env, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    _phantom(folder / 'a.nii.gz')
    (folder / 'b.nii.gz').write_bytes(b'not an image')
    _phantom(folder / 'c.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(folder), '--o', str(tmp_path / 'out'), '--fast',
                       '--vol', str(tmp_path / 'v.csv')])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert 'b.nii.gz' in err and '1 of 3' in err
    assert sorted(os.listdir(tmp_path / 'out')) == ['a_synthseg.nii.gz', 'c_synthseg.nii.gz']
    assert [r[0] for r in csv.reader(open(tmp_path / 'v.csv'))][1:] == ['a', 'c']


@pytest.mark.parametrize('flag', ['--parc', '--robust', '--v1'])
def test_cli_refuses_models_not_shipped(tmp_path, models_env, capsys, flag):
    _phantom(tmp_path / 'scan.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.mgz'),
                       flag])
    assert e.value.code == 1
    assert 'not yet available' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 's.mgz')


def test_cli_unwritable_output_fails_before_work(tmp_path, models_env, capsys):
    _phantom(tmp_path / 'scan.nii.gz')
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'),
                       '--o', str(tmp_path / 'afile' / 'seg.mgz')])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert 'seg.mgz' in err and len(err.strip().splitlines()) == 1


def test_cli_missing_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(tmp_path / 'nothing'))
    _phantom(tmp_path / 'scan.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.mgz')])
    assert e.value.code == 1 and 'not yet available' in capsys.readouterr().err


@pytest.mark.parametrize('n', [96, 160, 192, 224, 256, 272])
def test_axis_tiles_cover_with_overlap(n):
    size, starts = predict._axis_tiles(n, 144, 16, 8)
    assert size % 8 == 0 and size <= max(n, 144) and starts[0] == 0 and starts[-1] + size == n
    assert all(b - a <= size - 16 for a, b in zip(starts, starts[1:]))   # overlap >= 16


def test_resample_box_maps_coarse_posteriors_to_1mm():
    # a 2 mm grid whose box holds label channel 1 in its centre
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    post = np.zeros((6, 6, 6, 2), np.float32)
    post[..., 0] = 1
    post[2:4, 2:4, 2:4] = [0, 1]
    box = (slice(4, 10),) * 3                  # where that box sits in the 2 mm grid
    dst = np.eye(4)
    out, dbox = predict.resample_box(post, box, src, (40, 40, 40), dst)
    assert np.allclose(out.sum(-1), 1)
    start = np.array([s.start for s in dbox])
    world_centre = 2.0 * (4 + 2.5)             # centre of the labelled 2 mm voxels, in mm
    centre = np.argwhere(out[..., 1] > 0.5).mean(0) + start
    assert np.allclose(centre, world_centre, atol=0.6)
    assert out[..., 1].max() == pytest.approx(1.0)


def test_cli_with_a_2mm_network(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / 'models'
    folder.mkdir()
    card = json.loads((tiny_model_dir / 'synthseg.json').read_text())
    card['input']['voxsize_mm'] = 2.0
    (folder / 'synthseg.json').write_text(json.dumps(card))
    (folder / 'synthseg.weights.h5').write_bytes((tiny_model_dir / 'synthseg.weights.h5')
                                                 .read_bytes())
    monkeypatch.setenv('SYNTHKIT_MODELS', str(folder))
    _phantom(tmp_path / 'scan.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.nii.gz'),
                       '--vol', str(tmp_path / 'v.csv')])
    assert e.value.code == 0
    seg = io.load_volume(str(tmp_path / 's.nii.gz'), allow_empty=True)
    assert np.allclose(seg.voxsize, 1.0)          # outputs stay at 1 mm


def test_image_statistics_mode_normalizes_each_input_by_itself(tiny_model_dir):
    card = json.loads((tiny_model_dir / 'synthseg.json').read_text())
    weights = str(tiny_model_dir / 'synthseg.weights.h5')
    moving, _ = nets.load_unet(weights, card)
    card['input']['norm_statistics'] = 'image'
    own, _ = nets.load_unet(weights, card)
    assert isinstance(own, nets.ImageStatistics) and own.output_shape == moving.output_shape
    x = 5 + 3 * np.random.default_rng(0).random((1, 16, 16, 16, 1)).astype(np.float32)
    expected = np.asarray(moving(x, training=True))          # as during training
    assert np.allclose(own.predict_on_batch(x), expected, atol=1e-5)
    assert not np.allclose(moving.predict_on_batch(x), expected, atol=1e-3)


# ----------------------------------------------- geometry of the 2 mm network grid and back
def _blob_map(shape=(70, 76, 64)):
    """Label map (1 mm) of thick ellipsoids, off-centre: two touching hemispheres (2, 41) with
    structures inside them and a brain-stem (16) joining them, one connected brain as the
    post-processing expects."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing='ij'), -1)
    out = np.zeros(shape, np.int32)
    blobs = ((16, (35, 30, 44), (7, 9, 9)), (2, (24, 36, 30), (13, 16, 13)),
             (41, (46, 36, 30), (13, 16, 13)), (4, (26, 40, 24), (5, 6, 5)),
             (43, (44, 40, 24), (5, 6, 5)), (17, (20, 26, 32), (4, 6, 5)))
    for label, centre, radii in blobs:
        out[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = label
    return out


class OracleSegmenter(inference.Segmenter):
    """The Segmenter's own geometry (conform to its network grid, posteriors back to the 1 mm
    output grid, post-processing) with a perfect 'network': the one-hot reference label map,
    resampled (linear) onto whatever network grid the segmenter asks for."""

    def __init__(self, ref, ref_affine, voxsize):
        self.labels = tuple(LABELS)
        self.voxsize = voxsize
        self.cfg = nets.UNetConfig()
        self.onehot = np.stack([ref == k for k in self.labels], -1).astype(np.float32)
        self.ref_affine = ref_affine

    def posteriors(self, conformed, fast=False):
        post = geometry.resample(self.onehot, self.ref_affine, conformed.shape, conformed.affine,
                                 'linear')
        post[post.sum(-1) == 0, 0] = 1
        box = predict.brain_box(post, 0)
        return post[box], box


@pytest.mark.parametrize('voxsize', [1.0, 2.0])
@pytest.mark.parametrize('orientation', ['RAS', 'LIA', 'PSR'])
def test_oracle_posteriors_come_back_to_1mm_in_place(voxsize, orientation):
    """A perfect network's posteriors on the 2 mm (or 1 mm) network grid, through the same
    conform / resample-back / post-processing path as real ones: Dice >= 0.93 against the
    reference and no structure's centroid more than 0.25 mm off, for inputs in any orientation."""
    ref = _blob_map()
    affine = np.eye(4)
    affine[:3, :3] = geometry.orientation_matrix(orientation)
    affine[:3, 3] = [-31.0, 12.5, -40.0]
    image = (ref > 0).astype(np.float32) * 100 + 10
    result = OracleSegmenter(ref, affine, voxsize).segment(image, affine)
    back = geometry.to_input_grid(result.hard, result.grid, 'nearest')
    labels = [k for k in np.unique(ref) if k]
    dice = metrics.dice_table(back, ref, labels)
    assert min(dice.values()) >= 0.93, dice
    offsets = metrics.centroid_offsets(back, ref, labels)
    worst = max(np.abs(o).max() for o in offsets.values())      # input voxels are 1 mm
    assert worst < 0.25, offsets


def test_slabs_refined_on_several_threads_give_the_same_result(monkeypatch):
    """Segmenter.segment refines its 1 mm slabs on OMP_NUM_THREADS threads: labels, soft
    volumes, QC scores and posteriors are those of one thread, exactly (the sums are added in
    the same order)."""
    ref = _blob_map()
    affine = np.eye(4)
    affine[:3, :3] = geometry.orientation_matrix('LIA')
    rng = np.random.default_rng(4)
    image = ref.astype(np.float32) + rng.normal(0, 3, ref.shape).astype(np.float32)
    results = []
    for threads in ('1', '3'):
        monkeypatch.setenv('OMP_NUM_THREADS', threads)
        results.append(OracleSegmenter(ref, affine, 2.0).segment(image, affine,
                                                                 keep_posteriors=True))
    one, three = results
    assert one.hard.shape[2] > 3 * 16                  # several slabs of 16 planes
    np.testing.assert_array_equal(one.hard, three.hard)
    np.testing.assert_array_equal(one.posteriors, three.posteriors)
    assert one.volumes == three.volumes and one.qc == three.qc
    assert len(set(np.unique(one.hard)) - {0}) >= 5


@pytest.mark.parametrize('threads', ['1', '3'])
def test_upsampling_in_slabs_matches_resampling_the_whole_box(threads, monkeypatch):
    """Slab by slab (made ahead by OMP_NUM_THREADS threads, given in order) = the whole box."""
    monkeypatch.setenv('OMP_NUM_THREADS', threads)
    rng = np.random.default_rng(0)
    post = rng.random((30, 34, 28, 5)).astype(np.float32)
    post /= post.sum(-1, keepdims=True)
    src = np.eye(4)
    src[:3, :3] = geometry.orientation_matrix('LIA') * 2
    src[:3, 3] = [40, -50, 30]
    dst = np.eye(4)
    dst[:3, :3] = geometry.orientation_matrix('LIA')
    dst[:3, 3] = [40.5, -50.5, 30.5]
    box = (slice(3, 27), slice(5, 30), slice(2, 20))
    ref, ref_box = predict.resample_box(post[box], box, src, (64, 70, 60), dst)
    expected = np.zeros((64, 70, 60, 5), np.float32)
    expected[..., 0] = 1
    expected[ref_box] = ref
    got = expected * 0
    got[..., 0] = 1
    planes = []
    for sl, part in predict.upsample_slabs(post[box], box, src, (64, 70, 60), dst, slab=7):
        got[sl] = part
        planes.append(part.shape[2])                # slabs along the last axis
    assert max(planes) <= 7 and len(planes) > 3
    assert np.abs(got - expected).max() < 1e-5


def test_work_ahead_keeps_order_bounds_lookahead_and_stops_with_its_consumer():
    import threading
    import time
    lock, live, peak, started = threading.Lock(), [0], [0], []

    def work(i):
        with lock:
            started.append(i)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01 * (i % 3))                  # finishing out of order
        with lock:
            live[0] -= 1
        return i * i

    assert list(predict.ahead(work, list(range(12)), 2)) == [i * i for i in range(12)]
    assert peak[0] <= 2                             # two workers
    peak[0] = 0
    assert list(predict.ahead(work, list(range(5)), 0)) == [i * i for i in range(5)]
    assert peak[0] == 1                             # no workers: one at a time, the caller's
    assert list(predict.ahead(work, (i for i in range(7)), 3)) == [i * i for i in range(7)]
    started.clear()
    gen = predict.ahead(work, list(range(50)), 1)
    assert next(gen) == 0
    gen.close()                                     # the consumer stops: the rest is not run
    assert len(started) <= 4


def test_upsampling_two_grids_averages_them_where_both_reach():
    """Two samplings of one coarse field of view half a voxel apart (the second network grid of
    mri_synthseg): the slabs cover both boxes and hold the mean of the two grids' trilinear
    posteriors where both reach, one grid's alone where only it does."""
    rng = np.random.default_rng(2)
    dst = np.eye(4)
    dst[:3, :3] = geometry.orientation_matrix('LIA')
    dst[:3, 3] = [40.5, -50.5, 30.5]
    grids = []
    for shift in (0.0, 0.5):
        _, src = geometry.conform_grid((60, 64, 56), dst, voxsize=2.0,
                                       offset=(shift,) * 3)
        post = rng.random((30, 32, 28, 4)).astype(np.float32)
        post /= post.sum(-1, keepdims=True)
        box = (slice(3, 25), slice(4, 28), slice(2, 22)) if shift else \
            (slice(2, 24), slice(5, 29), slice(3, 24))
        grids.append((post[box], box, src))
    shape = (60, 64, 56)
    each = []
    for post, box, src in grids:
        one = np.zeros(shape + (4,), np.float32)
        hit = np.zeros(shape, bool)
        for sl, part in predict.upsample_slabs(post, box, src, shape, dst):
            one[sl] = part
            hit[sl] = True
        each.append((one, hit))
    assert not np.allclose(grids[0][2], grids[1][2])            # the grids differ
    both = np.zeros(shape + (4,), np.float32)
    covered = np.zeros(shape, bool)
    for sl, part in predict.upsample_slabs(*[list(x) for x in zip(*grids)], shape, dst, slab=5):
        both[sl] = part
        covered[sl] = True
        assert part.shape[2] <= 5
    assert covered[each[0][1]].all() and covered[each[1][1]].all()
    np.testing.assert_allclose(both.sum(-1)[covered], 1, atol=1e-5)
    # well inside both boxes (each grid's weights sum to one there): the plain mean
    inner = (slice(12, 44), slice(14, 50), slice(12, 40))
    np.testing.assert_allclose(both[inner], (each[0][0][inner] + each[1][0][inner]) / 2,
                               atol=1e-5)


def test_second_network_grid_is_half_a_voxel_off_and_skipped_when_fast(tiny_model_dir,
                                                                      tmp_path, monkeypatch):
    """A 2 mm network samples the scan on two grids half a voxel apart (not with --fast), and
    the labels stay those of the phantom."""
    models = tmp_path / 'models'
    models.mkdir()
    card = json.loads((tiny_model_dir / 'synthseg.json').read_text())
    card['input']['voxsize_mm'] = 2.0
    (models / 'synthseg.json').write_text(json.dumps(card))
    os.symlink(tiny_model_dir / 'synthseg.weights.h5', models / 'synthseg.weights.h5')
    monkeypatch.setenv('SYNTHKIT_MODELS', str(models))
    seg = inference.Segmenter()
    seen = []
    real = seg.posteriors

    def spy(net, fast=False):
        seen.append(net.affine.copy())
        return real(net, fast)

    seg.posteriors = spy
    data, affine = _phantom(tmp_path / 'scan.nii.gz', shape=(40, 44, 36))
    two = seg.segment(data, affine)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1][:3, 3] - seen[0][:3, 3], seen[0][:3, :3] @ [0.5, 0.5, 0.5])
    seen.clear()
    seg.segment(data, affine, fast=True)
    assert len(seen) == 1
    seg.second_grid = False
    seen.clear()
    one = seg.segment(data, affine)
    assert len(seen) == 1 and two.hard.shape == one.hard.shape
    assert set(np.unique(two.hard)) <= set(LABELS)


def test_summary_over_parts_equals_the_whole():
    rng = np.random.default_rng(1)
    post = rng.random((12, 10, 8, len(LABELS))).astype(np.float32)
    post /= post.sum(-1, keepdims=True)
    whole = inference.Summary(LABELS)
    whole.add(post)
    parts = inference.Summary(LABELS)
    parts.add(post[:5])
    parts.add(post[5:])
    assert whole.volumes() == pytest.approx(parts.volumes())
    assert whole.qc() == pytest.approx(parts.qc())
    assert inference.volumes(post, LABELS) == pytest.approx(whole.volumes())


def test_content_box_holds_the_image_in_whole_network_blocks():
    data = np.zeros((64, 48, 40), np.float32)
    data[10:20, 5:30, 33:37] = 1
    box = inference.content_box(data, divisor=8, margin=4)
    sizes = [s.stop - s.start for s in box]
    assert all(n % 8 == 0 for n in sizes)
    assert box[0].start <= 6 and box[0].stop >= 24 and box[2].stop <= 40
    assert data[box].sum() == data.sum()
    assert inference.content_box(np.zeros((16, 16, 16)), 8) == (slice(0, 16),) * 3


def test_float16_conversion_drops_only_what_float16_cannot_hold_normally():
    x = np.array([0.5, -0.25, 1e-3, 7e-5, 6e-5, -3e-5, 1e-9, 0.0], np.float32)
    got = predict.to_float16(x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[:4], x[:4].astype(np.float16))    # normal float16 values
    assert not got[4:].any()               # below 2**-14 (6.1e-5): subnormal in float16, zeroed
    assert np.abs(got.astype(np.float32) - x).max() < 2 ** -14 + 1e-3 * 0.5


def test_float16_conversion_is_the_same_on_views_and_across_blocks():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((9, 70, 130, 3)) *
         10.0 ** rng.integers(-9, 3, (9, 70, 130, 3))).astype(np.float32)   # > one 64k block
    x.flat[::1000] = np.nan

    def expected(a):
        a = np.asarray(a, np.float32)
        return np.where(np.abs(a) < np.finfo(np.float16).tiny, np.float32(0),
                        a).astype(np.float16)
    for view in [x, x[::2], x[..., 1:], x.transpose(2, 0, 3, 1), x.astype(np.float64), x[0, 0]]:
        got = predict.to_float16(view)
        assert got.shape == view.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected(view))


@pytest.mark.parametrize('preset, expected', [(None, '1'), ('0', '0')])
def test_segmenting_tools_choose_the_system_allocator_before_tensorflow(preset, expected):
    # oneDNN reads TF_ONEDNN_USE_SYSTEM_ALLOCATOR once, when TensorFlow loads: importing the
    # tools must set it (a user's own value kept) while TensorFlow is still unloaded.
    code = ('import os, sys\n'
            'import synthkit.models.synthseg.cli, synthkit.models.synthstrip.cli\n'
            'print("tensorflow" in sys.modules, os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR"))\n')
    env = {k: v for k, v in os.environ.items() if k != 'TF_ONEDNN_USE_SYSTEM_ALLOCATOR'}
    if preset is not None:
        env['TF_ONEDNN_USE_SYSTEM_ALLOCATOR'] = preset
    env['PYTHONPATH'] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), 'python')
    done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['False', expected]


def test_weighted_argmax_moves_only_close_calls_to_the_weighted_label():
    labels = (0, 2, 3)
    post = np.array([[0.2, 0.5, 0.3],       # cortex x1.75 = 0.525 > 0.5: becomes cortex
                     [0.1, 0.6, 0.3],       # 0.525 < 0.6: stays white matter
                     [0.7, 0.0, 0.3]], np.float32)[None, None]
    assert inference.hard_segmentation(post, labels).ravel().tolist() == [2, 2, 0]
    assert inference.hard_segmentation(post, labels, {3: 1.75}).ravel().tolist() == [3, 2, 0]


def _blurred_boundary(rng, shape=(40, 12, 12), edge=20, ramp=6):
    """A scan with an intensity edge at x = ``edge`` between two tissues (0.3 | 0.7, noisy), a
    background slab at x < 4, and posteriors that place the boundary only roughly: a linear
    ramp over ``ramp`` voxels each side, as a 2 mm network upsampled to 1 mm gives."""
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    image = np.where(x < edge, 0.3, 0.7) + rng.normal(0, 0.03, shape)
    image[x < 4] = 0
    post = np.zeros(shape + (3,), np.float32)         # channels: background, A, B
    b = np.clip((x - (edge + 3 - ramp)) / (2 * ramp), 0, 1)   # centred 3 voxels too far
    post[..., 2] = b
    post[..., 1] = 1 - b
    post[x < 4] = [1, 0, 0]
    post[x == 4] = [0.5, 0.5, 0]
    return image.astype(np.float32), post


def test_intensity_model_moves_blurred_boundaries_to_the_intensity_edge():
    """The Gaussian intensity model (fitted on a 2 mm grid of the scan) puts the boundary the
    network's posteriors only placed roughly (3 voxels off) at the image's edge, keeps the
    network's background posterior exactly and the posteriors summing to one."""
    rng = np.random.default_rng(0)
    image, post = _blurred_boundary(rng)
    before = np.argmax(post, -1)[:, 6, 6]
    assert np.flatnonzero(before == 2)[0] == 24          # the network's boundary
    model = inference.IntensityModel(3, bg=0)
    model.fit(image[::2, ::2, ::2], post[::2, ::2, ::2])
    mean, var, fitted = model.parameters()
    assert fitted.tolist() == [False, True, True]
    # the confident voxels of A include some of B's (the posteriors are off): roughly fitted
    np.testing.assert_allclose(mean[1:], [0.3, 0.7], atol=0.08)
    assert (np.sqrt(var[1:]) < 0.2).all()
    out = model.apply(post, image)
    np.testing.assert_array_equal(out[..., 0], post[..., 0])
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-5)
    after = np.argmax(out, -1)
    assert (after[5:20] == 1).all()
    # B's planes where A's posterior is not zero: all but the noisiest voxels (A's Gaussian, fitted
    # on voxels of both, is the broader one)
    assert min((after[x] == 2).mean() for x in range(20, 29)) > 0.95
    assert (after[29:] == 2).all()
    # far from the boundary the network's near-certain labels are not overturned by intensity
    odd = image.copy()
    odd[30:33, 5:8, 5:8] = 0.3                         # tissue A's intensity inside B
    assert (np.argmax(model.apply(post, odd), -1)[30:33, 5:8, 5:8] == 2).all()


def test_intensity_model_leaves_labels_without_enough_voxels_as_they_were():
    """A label the network never gives more than the threshold is not fitted: its likelihood is
    the average fitted label's, so its posterior keeps its ratio to the others' mean."""
    rng = np.random.default_rng(1)
    image, post = _blurred_boundary(rng)
    post = np.concatenate([post, np.zeros(post.shape[:3] + (1,), np.float32)], -1)
    post[..., 3] = 0.2 * post[..., 1]                   # a faint fourth label
    post[..., 1] *= 0.8
    model = inference.IntensityModel(4, bg=0)
    model.fit(image, post)
    assert model.parameters()[2].tolist() == [False, True, True, False]
    out = model.apply(post, image)
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-5)
    assert np.isfinite(out).all()
    empty = inference.IntensityModel(4, bg=0)          # nothing fitted: unchanged
    np.testing.assert_array_equal(empty.apply(post, image), post)


def test_intensity_model_table_matches_each_voxels_likelihood():
    """apply's table of likelihoods (the nearest of table_bins intensities) gives each voxel's
    own (exact=True) to 1e-3, for narrow Gaussians (the smallest standard deviation) spread over
    the intensity range, an unfitted label among them; the background stays the network's."""
    rng = np.random.default_rng(4)
    c = 12
    means = np.linspace(0.05, 0.95, c - 1)
    truth = rng.integers(1, c, (30, 30, 30))
    image = (means[truth - 1] + rng.normal(0, 0.03, truth.shape)).astype(np.float32)
    logits = rng.normal(0, 1.5, truth.shape + (c,)) + 5 * np.eye(c)[truth]
    logits[..., c - 1] -= 9                                  # too faint to be fitted
    post = np.exp(logits)
    post[:3] = np.eye(c)[0]                                  # background
    post = (post / post.sum(-1, keepdims=True)).astype(np.float32)
    model = inference.IntensityModel(c, bg=0)
    model.fit(image, post)
    mean, var, fitted = model.parameters()
    assert not fitted[c - 1] and fitted[1:c - 1].all()
    assert np.sqrt(var[fitted]).min() < 0.06
    table, exact = model.apply(post, image), model.apply(post, image, exact=True)
    assert np.abs(exact - post).max() > 0.5                  # the model does something
    np.testing.assert_allclose(table, exact, atol=1e-3)
    assert (table.argmax(-1) == exact.argmax(-1)).mean() > 0.999
    np.testing.assert_array_equal(table[..., 0], post[..., 0])


@pytest.fixture
def intensity_calls(monkeypatch):
    """The shapes IntensityModel.apply is called with (a spy)."""
    calls = []
    real = inference.IntensityModel.apply

    def spy(self, post, image):
        calls.append(post.shape)
        return real(self, post, image)

    monkeypatch.setattr(inference.IntensityModel, 'apply', spy)
    return calls


def test_segment_uses_the_intensity_model_only_when_asked(tiny_model_dir, tmp_path,
                                                           monkeypatch, intensity_calls):
    """Segmenter.segment refines the 1 mm posteriors with the scan's intensity model by
    default; the QC scores stay the network's own."""
    monkeypatch.setenv('SYNTHKIT_MODELS', str(tiny_model_dir))
    seg = inference.Segmenter()
    data, affine = _phantom(tmp_path / 'scan.nii.gz', shape=(40, 44, 36))
    calls = intensity_calls
    refined = seg.segment(data, affine)
    assert calls
    seg.intensity_model = False
    calls.clear()
    plain = seg.segment(data, affine)
    assert not calls
    assert refined.qc == pytest.approx(plain.qc)
    assert set(np.unique(refined.hard)) <= set(LABELS)


def test_intensity_model_shares_a_fluid_between_labels():
    """A label given another's Gaussian (``shared``: the inferior lateral ventricle takes the
    lateral ventricle's fluid) ignores its own voxels' intensities."""
    rng = np.random.default_rng(2)
    image, post = _blurred_boundary(rng)
    post = np.concatenate([post, np.zeros(post.shape[:3] + (1,), np.float32)], -1)
    post[30:34, ..., 2:] = [0.45, 0.55]     # a twin of A the network puts over B's voxels
    own = inference.IntensityModel(4, bg=0)
    own.fit(image, post)
    tied = inference.IntensityModel(4, bg=0, shared={3: 1})
    tied.fit(image, post)
    mean, var, fitted = tied.parameters()
    assert mean[3] == mean[1] and var[3] == var[1] and fitted[3]
    assert own.parameters()[0][3] == pytest.approx(0.7, abs=0.02)   # on its own: B's
    assert (np.argmax(own.apply(post, image), -1)[30:34] == 3).mean() > 0.9
    assert (np.argmax(tied.apply(post, image), -1)[30:34] == 2).all()


def test_cli_disable_intensity_model(tmp_path, models_env, capsys, intensity_calls):
    """--disable_intensity_model: labels from the network's posteriors alone."""
    _phantom(tmp_path / 'scan.nii.gz')
    calls = intensity_calls
    for flags in (['--disable_intensity_model'], []):
        with pytest.raises(SystemExit) as e:
            synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'),
                           '--o', str(tmp_path / ('a%d.mgz' % len(flags)))] + flags)
        assert e.value.code == 0, capsys.readouterr().err
        assert bool(calls) == (not flags)          # on by default


def test_inference_precision_names(monkeypatch):
    """SYNTHKIT_PRECISION: float32, bfloat16 (= mixed_bfloat16), or auto (bfloat16 only where
    the hardware has it); anything else is a one-line error naming the variable."""
    from synthkit import backend
    monkeypatch.setenv('SYNTHKIT_PRECISION', 'bfloat16')
    assert backend.inference_precision() == 'mixed_bfloat16'
    assert backend.inference_precision('float32') == 'float32'
    monkeypatch.setenv('SYNTHKIT_PRECISION', ' Float32 ')
    assert backend.inference_precision() == 'float32'
    for hardware, expected in ((True, 'mixed_bfloat16'), (False, 'float32')):
        monkeypatch.setattr(backend, 'bfloat16_hardware', lambda: hardware)
        assert backend.inference_precision('auto') == expected
        monkeypatch.delenv('SYNTHKIT_PRECISION')
        assert backend.inference_precision() == expected
        monkeypatch.setenv('SYNTHKIT_PRECISION', 'float32')
    monkeypatch.setenv('SYNTHKIT_PRECISION', 'float16')
    with pytest.raises(ValueError, match='SYNTHKIT_PRECISION'):
        backend.inference_precision()


def test_bfloat16_inference_matches_float32(models_env, tmp_path):
    """A Segmenter in bfloat16 computes its convolutions in bfloat16 (the softmax head in
    float32) with the same float32 weights, leaves the global policy float32, gives posteriors
    within bfloat16's rounding of float32's, and segments a scan end to end."""
    import keras
    full = inference.Segmenter(precision='float32')
    half = inference.Segmenter(precision='bfloat16')
    assert keras.config.dtype_policy().name == 'float32'
    convs = [c for c in half.model._flatten_layers() if isinstance(c, keras.layers.Conv3D)]
    assert {c.compute_dtype for c in convs if c.name != 'head'} == {'bfloat16'}
    assert {c.dtype_policy.compute_dtype for c in convs if c.name == 'head'} == {'float32'}
    assert all(w.dtype == 'float32' for w in half.model.weights)
    x = np.random.default_rng(1).random((1, 32, 32, 32, 1)).astype(np.float32)
    a = np.asarray(full.model.predict_on_batch(x))
    b = np.asarray(half.model.predict_on_batch(x))
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.02
    assert np.abs(a - b).max() > 0                       # it did compute in another precision
    data, affine = _phantom(tmp_path / 'scan.nii.gz')
    result = half.segment(data, affine)
    assert set(np.unique(result.hard)) <= set(LABELS)
