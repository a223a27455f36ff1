"""SynthSR: training data (real-T1 subjects and rendered targets), the training model with the
frozen SynthSeg term, and mri_synthsr end to end with a tiny random-weight network."""

import json
import os

import keras
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers import seeded
from synthkit import models, nets
from synthkit import labels as lab
from synthkit.models.synthsr import cli as synthsr
from synthkit.models.synthsr import task as srtask
from synthkit.models.synthsr.inference import sharpen
from synthkit.task import TrainConfig

SIZE = 40


def _phantom(size=SIZE):
    """(aseg, T1) of a spherical 'head': WM hemispheres (2 / 41) with a midline corpus callosum
    (251), cortex, a ventricle, one label no generator knows (999), scalp of two intensities."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij')) - (size - 1) / 2
    r = np.sqrt((grid ** 2).sum(0))
    aseg = np.zeros((size,) * 3, np.int32)
    aseg[r < 12] = 3
    aseg[r < 9] = 2
    aseg[(r < 9) & (grid[0] > 0)] = 41
    aseg[(r < 9) & (np.abs(grid[0]) < 1)] = 251
    aseg[(r < 3) & (grid[0] < -1)] = 4
    aseg[(r < 2) & (grid[0] > 2)] = 999
    t1 = np.zeros((size,) * 3, np.float32)
    t1[np.isin(aseg, (2, 41, 251))] = 110
    t1[aseg == 3] = 70
    t1[aseg == 4] = 30
    t1[aseg == 999] = 90
    t1[(r >= 12) & (r < 15)] = 40           # dark skull
    t1[(r >= 15) & (r < 18)] = 150          # bright scalp
    return aseg, t1


def _subject(folder, name='sub-01'):
    aseg, t1 = _phantom()
    path = os.path.join(folder, name)
    os.makedirs(path)
    aff = np.diag([-1.0, -1, 1, 1])
    nib.save(nib.MGHImage(t1.astype(np.uint8), aff), os.path.join(path, 'T1.mgz'))
    nib.save(nib.MGHImage(aseg, aff), os.path.join(path, 'aseg.mgz'))
    return path


def _label_map(folder):
    aseg, _ = _phantom()
    labels = np.where(np.isin(aseg, (251, 999)), 2, aseg)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing='ij')) - (SIZE - 1) / 2
    r = np.sqrt((grid ** 2).sum(0))
    labels[(r >= 12) & (r < 18)] = 507
    path = os.path.join(folder, 'map.nii.gz')
    nib.save(nib.Nifti1Image(labels.astype(np.int16), np.diag([-1.0, -1, 1, 1])), path)
    return path


def test_subject_labels_map_the_aseg_and_cluster_the_head():
    aseg, t1 = _phantom()
    out = srtask.subject_generation_labels(t1, aseg)
    assert set(np.unique(out)) <= set(lab.GENERATION_LABELS)
    cc = aseg == 251
    assert set(np.unique(out[cc])) <= {2, 41}
    left = cc & (np.indices(aseg.shape)[0] < (SIZE - 1) / 2)
    assert (out[left] == 2).mean() > 0.9     # the side of the nearest hemisphere's WM
    assert (out[aseg == 999] != 999).all()
    skull, scalp = (aseg == 0) & (t1 == 40), (aseg == 0) & (t1 == 150)
    dark, bright = np.unique(out[skull]), np.unique(out[scalp])
    assert len(dark) == 1 and len(bright) == 1 and dark[0] != bright[0]
    order = list(srtask.HEAD_LABELS)
    assert order.index(dark[0]) < order.index(bright[0])      # clusters ranked by brightness
    assert (out[(aseg == 0) & (t1 == 0)] == 0).all()           # air stays background


def test_rendered_t1_has_mprage_contrast():
    labels = np.zeros((24, 24, 24), np.int32)
    labels[:8], labels[8:16], labels[16:] = 2, 3, 4          # WM, cortex, ventricle
    t1 = srtask.render_t1(labels, np.random.default_rng(0), blur_mm=0)
    wm, gm, csf = t1[:8].mean(), t1[8:16].mean(), t1[16:].mean()
    assert 0.85 < wm < 1.15 and csf < gm < wm
    assert 0 < t1[:8].std() < 0.1 * wm       # smooth within-structure variation, not texture


def test_prior_contrast_brings_brain_labels_to_the_rendered_contrast(tmp_path):
    """The 'prior' real-T1 targets: each brain label's median moves to its MPRAGE prior (cortex
    70 -> 66 of 110, ventricle 30 -> 30.5 with white matter 110 kept), within-label variation
    is scaled with it, and the head outside the brain is left as it is."""
    aseg, t1 = _phantom()
    t1 = t1 * (1 + 0.05 * np.random.default_rng(0).standard_normal(t1.shape))
    labels = srtask.subject_generation_labels(t1, aseg)
    out = srtask.prior_contrast(t1, labels, sigma_mm=0)
    prior = {k: srtask.WM_T1 * srtask.T1_MEANS[k] / srtask.T1_MEANS_WM for k in (2, 3, 4)}
    for k in (2, 3, 4):
        m = labels == k
        assert np.median(out[m]) == pytest.approx(prior[k], rel=1e-3)
        assert np.std(out[m]) / np.median(out[m]) == pytest.approx(
            np.std(t1[m]) / np.median(t1[m]), rel=1e-3)
    head = ~np.isin(labels, [k for k in srtask.T1_MEANS if k not in srtask.HEAD_LABELS])
    assert np.allclose(out[head], t1[head], rtol=1e-6)
    # with the gains smoothed, a label's core still reaches its prior
    smooth = srtask.prior_contrast(t1, labels)
    core = ndimage.binary_erosion(labels == 3)
    assert np.median(smooth[core]) == pytest.approx(prior[3], rel=0.03)
    # the training option reads the subject through it
    path = _subject(str(tmp_path))
    labels_real, real = srtask.load_training_item(path)
    labels_prior, harmonized = srtask.load_training_item(path, contrast='prior')
    assert np.array_equal(labels_real, labels_prior) and harmonized.dtype == np.uint8
    assert abs(np.median(harmonized[labels_prior == 3]) - prior[3]) <= 1
    assert np.median(real[labels_real == 3]) == 70
    with pytest.raises(ValueError, match='contrast'):
        srtask.load_training_item(path, contrast='t2')


@pytest.fixture(scope='module')
def bank_cfg(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('sr_data'))
    subject, label_map = _subject(folder), _label_map(folder)
    return TrainConfig(label_maps=[subject, label_map], val_maps=[subject, label_map],
                       task='synthsr', shape=(24, 24, 24), val_pairs=2,
                       unet=nets.UNetConfig(out_channels=1, final_activation='linear',
                                            features=4, levels=2,
                                            convs_per_level=1).to_dict(),
                       generator={'translation_range_mm': (-2.0, 2.0)},
                       task_options={'seg_weight': 0.0})


def test_targets_follow_the_deformed_anatomy(bank_cfg):
    """Under random affine + nonlinear deformation and flips, the target is the T1 of the
    anatomy the labels show: white matter (eroded, away from partial volume) is 110 / 110 for
    the real subject, about 1 for the rendered map; the input and labels share the grid."""
    task = models.create(bank_cfg)
    bank = task.make_bank(bank_cfg.label_maps)
    assert bank.images[0] is not None and bank.images[1] is None
    sampler, rng = task.stream(0)
    for entry in (0, 1):
        for _ in range(2):
            x, (t1, seg) = task.sample(sampler, srtask._OneEntry(bank, entry), rng, 1)
            assert x.shape == t1.shape == (1, 24, 24, 24, 1) and seg.shape == (1, 24, 24, 24)
            wm = np.isin(seg[0], [lab.SEGMENTATION_LABELS.index(k) for k in (2, 41)])
            wm = ndimage.binary_erosion(wm, iterations=2)
            assert wm.sum() > 50
            values = t1[0, ..., 0][wm]
            if entry == 0:
                assert np.median(values) == pytest.approx(1.0, abs=0.02)
            else:
                assert 0.8 < np.median(values) < 1.2


def _tiny_synthseg(folder, seed=1, name='synthseg', features=4):
    """A tiny random SynthSeg (2 mm, batch norm on image statistics) in ``folder``: its
    weights prefix."""
    seg_cfg = nets.UNetConfig(features=features, levels=2, convs_per_level=1)
    prefix = str(folder / name)
    seeded(nets.unet(seg_cfg), seed).save_weights(prefix + '.weights.h5')
    with open(prefix + '.json', 'w') as f:
        json.dump({'task': 'synthseg', 'architecture': {'type': 'unet', **seg_cfg.to_dict()},
                   'input': {'voxsize_mm': 2.0, 'norm_statistics': 'image'},
                   'output_labels': list(lab.SEGMENTATION_LABELS)}, f)
    return prefix


def test_training_model_with_frozen_synthseg_trains_and_reloads(tmp_path, bank_cfg):
    prefix = _tiny_synthseg(tmp_path)
    cfg = TrainConfig(**{**bank_cfg.__dict__,
                         'task_options': {'seg_weight': 0.25, 'seg_model': prefix}})
    task = models.create(cfg)
    model = task.build_model()
    frozen = [w.name for w in model.get_layer('frozen_synthseg').weights]
    assert frozen and not model.get_layer('frozen_synthseg').trainable_weights
    before = [np.array(w) for w in model.get_layer('frozen_synthseg').weights]
    bank = task.make_bank(cfg.label_maps)
    sampler, rng = task.stream(0)
    x, t = task.batch(sampler, bank, rng, 1)
    y = task.encode(t)
    assert y[1].shape == (1, 12, 12, 12, len(lab.SEGMENTATION_LABELS))     # at 2 mm
    losses = [float(np.ravel(np.asarray(model.train_on_batch(x, y)))[0]) for _ in range(3)]
    assert all(np.isfinite(losses))
    after = [np.array(w) for w in model.get_layer('frozen_synthseg').weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))   # SynthSeg stays frozen
    path = str(tmp_path / 'ckpt.keras')
    model.save(path)
    again = task.load_checkpoint(path)
    np.testing.assert_allclose(np.asarray(again.predict_on_batch(x)[0]),
                               np.asarray(model.predict_on_batch(x)[0]), atol=1e-5)
    assert task.exported_network(again).count_params() == \
        model.get_layer('synthsr_unet').count_params()


def test_sharpen_raises_edges_and_keeps_flat_regions():
    image = np.zeros((20, 20, 20), np.float32)
    image[:, :, 10:] = 100
    out = sharpen(image)
    assert out[10, 10, 10] > 100 and out[10, 10, 9] >= 0
    assert out[10, 10, 18] == pytest.approx(100, abs=0.5) and out[10, 10, 1] == 0


# -------------------------------------------------------------------------- command line
@pytest.fixture(scope='module')
def sr_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sr_model')
    _save_tiny_sr_model(folder, 'synthsr', seed=5)
    return folder


def _save_tiny_sr_model(folder, name, seed):
    """A tiny random plain SynthSR U-Net as ``folder/NAME.weights.h5`` with its card (task
    ``name``)."""
    cfg = nets.UNetConfig(out_channels=1, final_activation='linear', features=4, levels=2,
                          convs_per_level=1)
    seeded(nets.unet(cfg), seed).save_weights(str(folder / (name + '.weights.h5')))
    (folder / (name + '.json')).write_text(json.dumps({
        'task': name, 'architecture': {'type': 'unet', **cfg.to_dict()},
        'input': {'voxsize_mm': 1.0}}))


def _scan(path, voxsize=(1.2, 1.2, 4.0)):
    """An anisotropic thick-slice phantom scan, not in LIA."""
    _, t1 = _phantom(48)
    data = ndimage.zoom(t1, [1 / v for v in voxsize], order=1)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag(list(voxsize) + [1.0])), path)
    return path


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        synthsr.main(argv)
    return e.value.code, capsys.readouterr().err


def test_synthsr_writes_a_1mm_image_covering_the_input(tmp_path, sr_model, monkeypatch,
                                                       capsys):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(sr_model))
    inp = _scan(str(tmp_path / 'thick.nii.gz'))
    before = open(inp, 'rb').read()
    out = str(tmp_path / 'sr.mgz')
    code, err = run(['--i', inp, '--o', out, '--png'], capsys)
    assert code == 0, err
    img = nib.load(out)
    assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), 1.0)
    assert nib.aff2axcodes(img.affine) == ('L', 'I', 'A')
    data = np.asarray(img.dataobj)
    assert data.dtype.kind == 'f' and data.dtype.itemsize == 4
    assert np.isfinite(data).all() and data.min() >= 0
    fov = np.array(nib.load(inp).shape) * np.array([1.2, 1.2, 4.0])
    assert (np.sort(data.shape) >= np.sort(fov) - 1).all()        # covers the field of view
    assert data.max() > 0
    assert os.path.exists(str(tmp_path / 'sr.png'))
    assert open(inp, 'rb').read() == before

    # without flipping and sharpening: another (valid) result, same grid
    out2 = str(tmp_path / 'plain.nii.gz')
    code, err = run(['--i', inp, '--o', out2, '--disable_flipping', '--disable_sharpening'],
                    capsys)
    assert code == 0, err
    plain = np.asarray(nib.load(out2).dataobj)
    assert plain.shape == data.shape and not np.allclose(plain, data)


def test_synthsr_batch_goes_past_a_bad_file(tmp_path, sr_model, monkeypatch, capsys):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(sr_model))
    folder = tmp_path / 'in'
    folder.mkdir()
    _scan(str(folder / 'a.nii.gz'))
    (folder / 'b.nii.gz').write_bytes(b'not an image')
    code, err = run(['--i', str(folder), '--o', str(tmp_path / 'out')], capsys)
    assert code == 1
    assert os.path.exists(str(tmp_path / 'out' / 'a_synthsr.nii.gz'))
    assert not os.path.exists(str(tmp_path / 'out' / 'b_synthsr.nii.gz'))
    assert '1 of 2 input(s) failed' in err and 'b.nii.gz' in err


@pytest.mark.parametrize('flag, message', [
    ('--lowfield', '--lowfield: model not yet available'),
    ('--v1', '--v1: model not yet available'),
])
def test_synthsr_refuses_models_not_trained(tmp_path, sr_model, monkeypatch, capsys, flag,
                                            message):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(sr_model))
    inp = _scan(str(tmp_path / 'a.nii.gz'))
    code, err = run(['--i', inp, '--o', str(tmp_path / 'o.nii.gz'), flag], capsys)
    assert code == 1 and message in err and err.count('\n') == 1
    assert not os.path.exists(str(tmp_path / 'o.nii.gz'))


def test_synthsr_lowfield_runs_the_lowfield_model_where_it_is_shipped(tmp_path, sr_model,
                                                                     monkeypatch, capsys):
    """--lowfield takes models/synthsr_lowfield (a card of either SynthSR task), the plain
    command the standard model; synthkit-batch --lowfield the same."""
    import shutil
    from synthkit.batch import tools
    from synthkit.models.synthsr import inference
    folder = tmp_path / 'models'
    shutil.copytree(sr_model, folder)
    _save_tiny_sr_model(folder, 'synthsr_lowfield', seed=6)
    monkeypatch.setenv('SYNTHKIT_MODELS', str(folder))
    loaded = []
    original = inference.Synthesizer.__init__

    def spy(self, weights=None, card=None, *args, **kwargs):
        loaded.append(os.path.basename(weights))
        original(self, weights, card, *args, **kwargs)
    monkeypatch.setattr(inference.Synthesizer, '__init__', spy)
    inp = _scan(str(tmp_path / 'a.nii.gz'))
    outs = [str(tmp_path / n) for n in ('low.nii.gz', 'std.nii.gz')]
    for out, flags in zip(outs, (['--lowfield'], [])):
        code, err = run(['--i', inp, '--o', out] + flags, capsys)
        assert code == 0, err
    assert loaded == ['synthsr_lowfield.weights.h5', 'synthsr.weights.h5']
    low, std = (nib.load(o).get_fdata() for o in outs)
    assert low.shape == std.shape and not np.allclose(low, std)
    tool = tools.get('mri_synthsr', lowfield=True)
    assert os.path.basename(tool.weights) == 'synthsr_lowfield.weights.h5'
    assert tool.signature()['model'] != tools.get('mri_synthsr').signature()['model']


def test_synthsr_ct_clips_before_rescaling(tmp_path, sr_model, monkeypatch, capsys):
    """--ct clips to [0, 80] HU: bone at 1000 HU and air at -1000 do not set the contrast."""
    monkeypatch.setenv('SYNTHKIT_MODELS', str(sr_model))
    aseg, _ = _phantom(48)
    ct = np.full(aseg.shape, -1000.0, np.float32)
    ct[aseg > 0] = 30
    ct[np.isin(aseg, (2, 41, 251))] = 25
    grid = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing='ij')) - 23.5
    r = np.sqrt((grid ** 2).sum(0))
    ct[(r >= 12) & (r < 15)] = 1000
    path = str(tmp_path / 'ct.nii.gz')
    nib.save(nib.Nifti1Image(ct, np.eye(4)), path)
    outs = []
    for extra in ([], ['--ct']):
        out = str(tmp_path / ('o%d.nii.gz' % len(extra)))
        code, err = run(['--i', path, '--o', out] + extra, capsys)
        assert code == 0, err
        outs.append(np.asarray(nib.load(out).dataobj))
    assert not np.allclose(outs[0], outs[1])


def test_hybrid_network_trains_checkpoints_exports_and_synthesizes(tmp_path, bank_cfg,
                                                                  monkeypatch):
    """seg_input: the SR U-Net is fed the frozen SynthSeg's posteriors of its input too; the
    checkpoint reloads, the export carries the segmenter inside (the card says how to build
    it), and mri_synthsr's Synthesizer rebuilds and runs it."""
    from synthkit import trainer
    from synthkit.models.synthsr.inference import Synthesizer
    prefix = _tiny_synthseg(tmp_path)
    cfg = TrainConfig(**{**bank_cfg.__dict__, 'steps': 2, 'val_every': 2,
                         'unet': dict(bank_cfg.unet, norm=None),     # as the shipped one
                         'task_options': {'seg_weight': 0.25, 'seg_model': prefix,
                                          'seg_input': True}})
    task = models.create(cfg)
    net = task.network()
    assert net.get_layer('sr_core').input.shape[-1] == 1 + len(lab.SEGMENTATION_LABELS)
    assert not net.get_layer('frozen_synthseg').trainable_weights
    run = str(tmp_path / 'run')
    trainer.Trainer(cfg, run, progress=False).run()
    model = task.load_checkpoint(os.path.join(run, 'ckpt.keras'))
    x = np.random.default_rng(0).random((1, 24, 24, 24, 1)).astype(np.float32)
    expected = np.asarray(task.bare(model).predict_on_batch(x))
    # the frozen segmenter inside came back with its weights (not freshly initialized)
    inside = task.bare(model).get_layer('frozen_synthseg')
    original = srtask.frozen_segmenter(prefix)[0]
    for a, b in zip(inside.weights, original.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    card = trainer.export(run, str(tmp_path / 'synthsr'))
    assert card['architecture']['type'] == 'synthsr_hybrid'
    assert card['architecture']['segmenter_norm_statistics'] == 'image'
    sr = Synthesizer(str(tmp_path / 'synthsr.weights.h5'), card,
                     seg_model=prefix + '.weights.h5')
    assert sr.divisor == 4
    # run apart (segmenter on the whole image, the U-Net on the image and its posteriors) it
    # is the trained network (up to the float16 posteriors)
    split = np.asarray(sr.model.predict_on_batch(
        sr.with_posteriors(x[0, ..., 0]).astype(np.float32)[None]))
    np.testing.assert_allclose(split, expected, atol=2e-3)
    data = np.zeros((30, 30, 30), np.float32)
    data[5:25, 5:25, 5:25] = np.random.default_rng(1).random((20, 20, 20)) + 1
    out = sr.synthesize(data, np.eye(4))
    assert out.image.shape == out.grid.data.shape and np.isfinite(out.image).all()
    # the U-Net read from the hybrid's weights onto OpenVINO computes what Keras' does
    from synthkit import runtime
    if runtime.openvino_available():
        assert isinstance(sr.model, runtime.OpenVINOUNet)
        monkeypatch.setenv('SYNTHKIT_RUNTIME', 'keras')
        on_keras = Synthesizer(str(tmp_path / 'synthsr.weights.h5'), card,
                               seg_model=prefix + '.weights.h5')
        assert not isinstance(on_keras.model, runtime.OpenVINOUNet)
        np.testing.assert_allclose(on_keras.synthesize(data, np.eye(4)).image, out.image,
                                   atol=2e-3 * np.abs(out.image).max())
        monkeypatch.delenv('SYNTHKIT_RUNTIME')
    # fed the SynthSeg pipeline's refined 1 mm posteriors (the default), or its own 2 mm ones
    sr.refine = False
    own = sr.synthesize(data, np.eye(4))
    assert own.image.shape == out.image.shape and not np.allclose(own.image, out.image)


def test_refined_inputs_are_the_synthseg_pipelines_posteriors(tmp_path):
    """With ``refine``, the U-Net's posterior channels are what mri_synthseg's pipeline gives
    (its 1 mm posteriors, intensity model included) on SynthSR's own grid, the image channel
    SynthSR's conformed image."""
    from synthkit import geometry
    from synthkit.models.synthseg.inference import Segmenter, content_box
    from synthkit.models.synthsr.inference import Synthesizer, RefinedInputs
    prefix = _tiny_synthseg(tmp_path)
    seg = Segmenter(prefix + '.weights.h5', json.load(open(prefix + '.json')))
    sr = Synthesizer.__new__(Synthesizer)
    sr.seg_model, sr._pipeline = seg, None
    aseg, t1 = _phantom(48)
    affine = np.diag([1.1, 1.0, 1.2, 1.0])
    grid = geometry.conform((t1, affine), voxsize=1.0, multiple=16)
    box = content_box(grid.data, 8, margin=8)
    inputs = sr.refined_inputs(t1, affine, grid, box)
    assert isinstance(inputs, RefinedInputs)
    whole = inputs[tuple(slice(0, n) for n in inputs.shape[:3])]
    assert whole.shape == grid.data[box].shape + (1 + len(lab.SEGMENTATION_LABELS),)
    np.testing.assert_array_equal(whole[..., 0], grid.data[box].astype(np.float16))
    expected = seg.segment(t1, affine, keep_posteriors=True).posteriors[box]
    np.testing.assert_allclose(whole[..., 1:].astype(np.float32), expected, atol=2e-3)
    assert (whole[..., 1:].sum(-1) > 0.99).all()


def test_refined_posteriors_layer_is_the_intensity_model_on_trilinear_posteriors():
    """RefinedPosteriors (training graph) = IntensityModel.fit on the 2 mm grid, then .apply
    on the posteriors interpolated trilinearly to 1 mm (mri_synthseg's pipeline)."""
    from synthkit.models.synthseg.inference import IntensityModel
    rng = np.random.default_rng(0)
    c = 5
    lab2 = rng.integers(0, c, (6, 6, 6))
    lab2[:, :, :2] = 0
    logits = rng.normal(0, 1, (6, 6, 6, c)) + 4 * np.eye(c)[lab2]
    p2 = np.exp(logits)
    p2 = (p2 / p2.sum(-1, keepdims=True)).astype(np.float32)
    lab1 = np.repeat(np.repeat(np.repeat(lab2, 2, 0), 2, 1), 2, 2)
    image = (np.array([0, .2, .5, .7, .9])[lab1] + rng.normal(0, .05, lab1.shape)).astype(
        np.float32)
    low = image.reshape(6, 2, 6, 2, 6, 2).mean((1, 3, 5))
    model = IntensityModel(c, 0, shared={4: 3})
    model.fit(low, p2)
    coords = np.stack(np.meshgrid(*[(np.arange(12) - 0.5) / 2] * 3, indexing='ij'))
    up = np.stack([ndimage.map_coordinates(p2[..., k], coords, order=1, mode='nearest')
                   for k in range(c)], -1).astype(np.float32)
    expected = model.apply(up, image, exact=True)
    assert np.abs(expected - up).max() > 0.3                      # the model does something
    layer = srtask.RefinedPosteriors(bg=0, shared={4: 3})
    args = [image[None, ..., None], low[None, ..., None], p2[None]]
    out = np.asarray(layer(args + [p2[None]]))[0]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # a region given with one 2 mm voxel around it: the same inside
    padded = np.pad(p2, ((1, 1),) * 3 + ((0, 0),), mode='edge')
    out = np.asarray(layer(args + [padded[None]], margin=True))[0]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_refined_inputs_make_any_box_of_the_whole_input():
    from synthkit.models.synthsr.inference import RefinedInputs, _BrainBox
    rng = np.random.default_rng(3)
    image = rng.random((20, 16, 12)).astype(np.float32)          # grid[2:22, 1:17, 0:12]
    origin = (2, 1, 0)
    sink = _BrainBox().start(None, None)
    region = (slice(6, 15), slice(4, 12), slice(3, 13))           # posteriors known here
    post = rng.random((9, 8, 10, 3)).astype(np.float16)
    for i in range(0, 9, 4):             # given as slabs, float32 made float16 by prepare
        part = sink.prepare(post[i:i + 4].astype(np.float32))
        assert part.dtype == np.float16
        sink.write((slice(6 + i, min(15, 10 + i)),) + region[1:], part)
    got_region, got = sink.result(3, 0)
    assert got_region == region
    np.testing.assert_array_equal(got, post)
    whole_grid = np.zeros((24, 20, 16, 3), np.float16)
    whole_grid[..., 0] = 1
    whole_grid[region] = post
    expected = np.concatenate([image[..., None].astype(np.float16),
                               whole_grid[2:22, 1:17, 0:12]], -1)
    inputs = RefinedInputs(image, origin, got, got_region, 0)
    assert inputs.shape == expected.shape
    for box in [(slice(0, 20), slice(0, 16), slice(0, 12)), (slice(0, 4), slice(0, 3),
                slice(0, 2)), (slice(5, 17), slice(2, 16), slice(9, 12)), (slice(3, 9),)]:
        np.testing.assert_array_equal(inputs[box], expected[box])


@pytest.mark.parametrize('refine', [False, True])
def test_crop_mode_segments_the_whole_example_and_trains_the_unet_on_its_centre(tmp_path,
                                                                              bank_cfg, refine):
    """task option crop: the frozen segmenter sees the whole example (as it sees the whole scan
    at inference: on an 80 mm crop its labels agree with its whole-head ones at Dice 0.1-0.2),
    the U-Net its centre; the loss's segmenter sees the prediction pasted into the target T1;
    --init loads a hybrid export, checkpoints reload, the export is the plain hybrid. With
    refine_input, the posteriors of the centre are the refined ones of the whole example."""
    from synthkit import trainer
    prefix = _tiny_synthseg(tmp_path)
    opts = {'seg_weight': 0.25, 'seg_model': prefix, 'seg_input': True, 'refine_input': refine}
    cfg = TrainConfig(**{**bank_cfg.__dict__, 'steps': 2, 'val_every': 2,
                         'task_options': {**opts, 'crop': 16}})
    task = models.create(cfg)
    model = task.build_model()
    bank = task.make_bank(cfg.label_maps)
    sampler, rng = task.stream(0)
    x, t = task.batch(sampler, bank, rng, 1)
    image, context = x
    assert image.shape == context.shape == (1, 24, 24, 24, 1)
    assert not context[:, 4:20, 4:20, 4:20].any() and context.any()
    y = task.encode(t)
    assert y[0].shape == (1, 16, 16, 16, 1) and y[1].shape == (1, 8, 8, 8, 33)
    np.testing.assert_array_equal(y[0], t[0][:, 4:20, 4:20, 4:20])
    # the U-Net's input: the image and the posteriors of the whole example, then cropped
    hybrid = task.exported_network(model)
    probe = keras.Model(model.inputs, model.get_layer('centre_inputs').output)
    if refine:
        assert hybrid.get_layer('posteriors_refined') is not None
    whole = keras.Model(hybrid.inputs, hybrid.get_layer('image_and_posteriors').output)
    np.testing.assert_allclose(np.asarray(probe.predict_on_batch(x)),
                               np.asarray(whole.predict_on_batch(image))[:, 4:20, 4:20, 4:20],
                               atol=1e-5)
    sr, post = model.predict_on_batch(x)
    assert np.asarray(sr).shape == (1, 16, 16, 16, 1)
    assert np.asarray(post).shape == (1, 8, 8, 8, 33)
    pasted = keras.Model(model.inputs, model.get_layer('paste').output).predict_on_batch(x)
    np.testing.assert_allclose(np.asarray(pasted)[:, 4:20, 4:20, 4:20],
                               np.maximum(np.asarray(sr), 0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pasted)[:, :4], context[:, :4])
    losses = [float(np.ravel(np.asarray(model.train_on_batch(x, y)))[0]) for _ in range(2)]
    assert all(np.isfinite(losses))
    # --init from a hybrid export of the plain mode; then train, checkpoint, export
    plain = TrainConfig(**{**bank_cfg.__dict__, 'steps': 1, 'task_options': opts})
    trainer.Trainer(plain, str(tmp_path / 'plain'), progress=False).run()
    trainer.export(str(tmp_path / 'plain'), str(tmp_path / 'sr0'))
    run = str(tmp_path / 'run')
    trainer.Trainer(cfg, run, progress=False, init=str(tmp_path / 'sr0')).run()
    again = task.load_checkpoint(os.path.join(run, 'ckpt.keras'))
    card = trainer.export(run, str(tmp_path / 'sr1'))
    assert card['architecture']['type'] == 'synthsr_hybrid' and card['training']['steps'] == 2
    assert bool(card['architecture'].get('refine_input')) == refine
    reloaded, _ = srtask.load_hybrid(str(tmp_path / 'sr1.weights.h5'), card['architecture'])
    np.testing.assert_allclose(np.asarray(reloaded.predict_on_batch(image)),
                               np.asarray(task.exported_network(again).predict_on_batch(image)),
                               atol=1e-5)
    shipped = task.network()
    nets.load_weights(shipped, str(tmp_path / 'sr1.weights.h5'))
    for name in ('frozen_synthseg', 'sr_core'):
        for a, b in zip(shipped.get_layer(name).weights, again.get_layer(name).weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(shipped.get_layer('frozen_synthseg').weights,
                    srtask.frozen_segmenter(prefix)[0].weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))      # still frozen
    with pytest.raises(ValueError, match='multiple of 4'):
        models.create(TrainConfig(**{**cfg.__dict__, 'task_options': {**opts, 'crop': 18}})
                      ).build_model()


def _weights_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_set_segmenter_swaps_synthseg_in_an_export_and_a_checkpoint(tmp_path, bank_cfg):
    """scripts/synthsr_set_segmenter.py: a newer SynthSeg goes into a hybrid export (card
    records it) and into a crop-mode checkpoint (network and loss segmenters), the U-Net and the
    optimizer state stay; another architecture is refused with a one-line error."""
    import importlib.util
    old = _tiny_synthseg(tmp_path, seed=1, name='seg_old')
    new = _tiny_synthseg(tmp_path, seed=2, name='seg_new')
    other = _tiny_synthseg(tmp_path, seed=3, name='seg_wide', features=8)
    opts = {'seg_weight': 0.25, 'seg_model': old, 'seg_input': True, 'crop': 16}
    cfg = TrainConfig(**{**bank_cfg.__dict__, 'steps': 1, 'task_options': opts})
    task = models.create(cfg)
    model = task.build_model()
    bank = task.make_bank(cfg.label_maps)
    sampler, rng = task.stream(0)
    x, t = task.batch(sampler, bank, rng, 1)
    model.train_on_batch(x, task.encode(t))
    ckpt = str(tmp_path / 'ckpt.keras')
    model.save(ckpt)
    hybrid = task.exported_network(model)
    export = str(tmp_path / 'sr.weights.h5')
    hybrid.save_weights(export)
    with open(str(tmp_path / 'sr.json'), 'w') as f:
        json.dump({'task': 'synthsr', 'architecture': task.architecture(), 'training': {}}, f)
    new_seg = srtask.frozen_segmenter(new)[0].get_weights()
    assert not _weights_equal(hybrid.get_layer('frozen_synthseg').get_weights(), new_seg)

    spec = importlib.util.spec_from_file_location(
        'set_segmenter', os.path.join(os.path.dirname(__file__), '..', 'scripts',
                                      'synthsr_set_segmenter.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([export, '--seg', new + '.weights.h5']) == 0
    card = json.load(open(str(tmp_path / 'sr.json')))
    assert card['training']['segmenter']['weights'] == 'seg_new.weights.h5'
    swapped, _ = srtask.load_hybrid(export, card['architecture'])
    assert _weights_equal(swapped.get_layer('frozen_synthseg').get_weights(), new_seg)
    assert _weights_equal(swapped.get_layer('sr_core').get_weights(),
                          hybrid.get_layer('sr_core').get_weights())

    out = str(tmp_path / 'swapped.keras')
    assert script.main([ckpt, '--seg', new, '--out', out]) == 0
    again = task.load_checkpoint(out)
    for name in ('frozen_synthseg', 'loss_synthseg'):
        assert _weights_equal(again.get_layer(name).get_weights(), new_seg)
    assert _weights_equal(again.get_layer('sr_core').get_weights(),
                          model.get_layer('sr_core').get_weights())
    assert int(again.optimizer.iterations.numpy()) == 1
    assert _weights_equal(task.load_checkpoint(ckpt).get_layer('frozen_synthseg').get_weights(),
                          model.get_layer('frozen_synthseg').get_weights())   # input kept

    with pytest.raises(ValueError, match='differs in architecture'):
        srtask.replace_segmenter(export, other)
    with pytest.raises(ValueError, match='differs in architecture'):
        srtask.replace_segmenter(ckpt, other)


def test_tile_inputs_make_any_box_of_the_whole_input():
    from synthkit import predict
    from synthkit.models.synthsr.inference import TileInputs
    rng = np.random.default_rng(5)
    image = rng.random((12, 10, 8)).astype(np.float32)
    post = rng.random((6, 5, 4, 3)).astype(np.float16)
    whole = np.empty((12, 10, 8, 4), np.float16)        # the 2 mm posteriors repeated at 1 mm
    whole[..., 0] = predict.to_float16(image)
    for o in np.ndindex(2, 2, 2):
        whole[o[0]::2, o[1]::2, o[2]::2, 1:] = post
    inputs = TileInputs(image, post)
    assert inputs.shape == whole.shape and inputs.ndim == 4
    for box in [(slice(0, 12), slice(0, 10), slice(0, 8)), (slice(3, 9), slice(1, 10), slice(5, 8))]:
        np.testing.assert_array_equal(inputs[box], whole[box])
    # tiled prediction over it equals prediction over the whole array (a pointwise "network")
    import keras
    net = keras.Sequential([keras.Input((None, None, None, 4)),
                            keras.layers.Conv3D(2, 1, kernel_initializer='ones')])
    big_image = rng.random((32, 16, 16)).astype(np.float32)
    big_post = rng.random((16, 8, 8, 3)).astype(np.float16)
    lazy = predict.predict_tiled(net, TileInputs(big_image, big_post), tile=16, overlap=4,
                                 divisor=4)
    full = predict.predict_tiled(net, TileInputs(big_image, big_post)[
        (slice(0, 32), slice(0, 16), slice(0, 16))], tile=16, overlap=4, divisor=4)
    np.testing.assert_allclose(lazy, full, rtol=1e-6)


def test_lowfield_task_is_the_standard_recipe_on_low_field_like_inputs(tmp_path):
    from synthkit import generator as gen, models
    from synthkit.models.synthsr.task import LOWFIELD_GENERATOR
    maps = [str(tmp_path / 'label_maps' / m) for m in ('m1', 'm2', 'm3')]
    standard, low = (models.preset(n, maps) for n in ('synthsr', 'synthsr_lowfield'))
    assert low.task == 'synthsr_lowfield' and standard.task == 'synthsr'
    assert low.task_options == standard.task_options and low.unet == standard.unet
    assert low.generator == {**standard.generator, **LOWFIELD_GENERATOR}
    params = gen.GeneratorParams.from_dict(low.generator)     # valid generator parameters
    assert params.anisotropic_inplane_range_mm == (1.2, 2.0) and params.resolution_prob == 1.0
