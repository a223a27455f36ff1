"""Training: losses, a short run on generated label maps, resume, export and warm start."""

import csv
import dataclasses
import json
import os

import keras
import nibabel as nib
import numpy as np
import pytest
from keras import ops

from synthkit import losses, metrics, models, nets, trainer
from synthkit.task import TrainConfig, override


def test_soft_dice_loss_values():
    y = np.zeros((1, 4, 4, 4, 2), np.float32)
    y[..., 0] = 1
    y[0, :2, ..., 0], y[0, :2, ..., 1] = 0, 1
    assert float(ops.mean(losses.soft_dice_loss(y, y))) == pytest.approx(0, abs=1e-6)
    swapped = y[..., ::-1]
    assert float(ops.mean(losses.soft_dice_loss(y, swapped))) == pytest.approx(1, abs=1e-4)
    half = np.full_like(y, 0.5)
    assert float(ops.mean(losses.soft_dice_loss(y, half))) == pytest.approx(0.5, abs=1e-3)


def test_dice_ce_adds_cross_entropy():
    y = np.zeros((1, 2, 2, 2, 2), np.float32)
    y[..., 0] = 1
    p = np.full_like(y, 0.5)
    pure = float(ops.mean(losses.DiceCELoss(0)(y, p)))
    both = float(ops.mean(losses.DiceCELoss(1)(y, p)))
    assert both - pure == pytest.approx(np.log(2), rel=1e-3)


def test_hard_dice():
    a = np.array([0, 1, 1, 2])
    b = np.array([0, 1, 2, 2])
    d = metrics.dice_per_label(a, b, [1, 2, 3])
    assert d[0] == pytest.approx(2 / 3) and d[1] == pytest.approx(2 / 3) and np.isnan(d[2])


def _label_maps(folder, n=3, size=28):
    paths = []
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij')) - size / 2
    r = np.sqrt((grid ** 2).sum(0))
    for i in range(n):
        lab = np.zeros((size,) * 3, np.int16)
        lab[r < 12 + i] = 24
        lab[r < 10 + i] = 3
        lab[r < 7] = 2
        lab[(r < 7) & (grid[0] > 0)] = 41
        lab[r < 3] = 4
        path = os.path.join(folder, 'map%d.nii.gz' % i)
        nib.save(nib.Nifti1Image(lab, np.diag([-1, -1, 1, 1.0])), path)
        paths.append(path)
    return paths


@pytest.fixture(scope='module')
def tiny_cfg(tmp_path_factory):
    maps = _label_maps(str(tmp_path_factory.mktemp('maps')))
    unet = nets.UNetConfig(features=4, levels=2, convs_per_level=1).to_dict()
    return TrainConfig(label_maps=maps[:2], val_maps=maps[2:], shape=(16, 16, 16),
                       unet=unet, generator={'translation_range_mm': (-2.0, 2.0)},
                       steps=6, val_every=3, val_pairs=1, checkpoint_minutes=0)


def test_run_resume_and_export(tiny_cfg, tmp_path):
    run = str(tmp_path / 'run')
    tiny_cfg.steps = 4
    trainer.Trainer(tiny_cfg, run, progress=False).run()
    assert json.load(open(os.path.join(run, 'state.json')))['step'] == 4
    tiny_cfg.steps = 6
    trainer.Trainer(tiny_cfg, run, progress=False).run()        # resumes at step 4
    rows = list(csv.DictReader(open(os.path.join(run, 'log.csv'))))
    assert [int(r['step']) for r in rows][-1] == 6
    vals = [r for r in rows if r['val_dice']]
    # every val_every steps and at the end of each run
    assert [int(r['step']) for r in vals] == [3, 4, 6]
    assert all(0 <= float(r['val_dice']) <= 1 for r in vals)
    assert all(np.isfinite(float(r['loss'])) for r in rows)

    card = trainer.export(run, str(tmp_path / 'models' / 'seg'),
                          label_dir=os.path.dirname(tiny_cfg.val_maps[0]))
    assert set(card['training']['validation_by_norm_statistics']) == {'moving', 'image'}
    assert card['input']['norm_statistics'] in ('moving', 'image')
    assert card['training']['steps'] == 6 and card['training']['label_maps'] == [
        'map0.nii.gz', 'map1.nii.gz']
    model = nets.unet(nets.UNetConfig.from_dict(
        {k: v for k, v in card['architecture'].items() if k != 'type'}))
    model.load_weights(str(tmp_path / 'models' / 'seg.weights.h5'))   # no optimizer state

    # a fresh run started from the shipped weights continues their step count
    tiny_cfg.steps = 8
    trainer.Trainer(tiny_cfg, str(tmp_path / 'run2'), progress=False,
                    init=str(tmp_path / 'models' / 'seg')).run()
    state = json.load(open(str(tmp_path / 'run2' / 'state.json')))
    assert state['step'] == 8
    # ... and the card's device history (steps 0-6 there, 6-8 here, merged)
    assert state['devices'] == [[0, 8, trainer.device_description()]]   # one device throughout
    assert card['training']['devices'] == [[0, 6, trainer.device_description()]]
    # ... and its learning curve: the card's points first, then this run's
    card2 = trainer.export(str(tmp_path / 'run2'), str(tmp_path / 'models' / 'seg2'))
    curve = [s for s, _ in card2['training']['validation_dice_synthetic']]
    assert curve == [3, 4, 6, 8]
    assert card2['training']['validation_dice_synthetic'][:3] == [
        tuple(v) for v in card['training']['validation_dice_synthetic']]


def test_snapshots_and_an_export_averaging_them(tiny_cfg, tmp_path):
    """--snapshot-every keeps the weights at checkpoints that many steps apart (and at the end),
    the last --snapshot-keep of them; --average K exports the mean of the last K (a stopped
    run's last checkpoint counts as the newest), and the card lists their steps."""
    cfg = TrainConfig(**{**tiny_cfg.__dict__, 'steps': 6, 'checkpoint_minutes': 0})
    run = str(tmp_path / 'run')
    trainer.Trainer(cfg, run, progress=False, snapshot_every=2, snapshot_keep=3).run()
    snaps = trainer.snapshots(run)
    assert [k for k, _ in snaps] == [3, 5, 6]          # 1 dropped (keep 3); 6: the end
    arch = nets.UNetConfig.from_dict(cfg.unet)
    weights = []
    for _, path in snaps:
        net = nets.unet(arch)
        net.load_weights(path)
        weights.append([np.asarray(v) for v in net.trainable_weights])
    assert not np.allclose(weights[0][0], weights[-1][0])

    plain = trainer.export(run, str(tmp_path / 'plain'))
    assert plain['training']['averaged_snapshots'] is None
    card = trainer.export(run, str(tmp_path / 'avg'), average=3)
    assert card['training']['averaged_snapshots'] == [3, 5, 6]
    net = nets.unet(arch)
    net.load_weights(str(tmp_path / 'avg.weights.h5'))
    for var, *vals in zip(net.trainable_weights, *weights):
        np.testing.assert_allclose(np.asarray(var), np.mean(vals, axis=0), rtol=1e-5, atol=1e-6)
    last = nets.unet(arch)
    last.load_weights(str(tmp_path / 'plain.weights.h5'))
    for a, b in zip(net.non_trainable_weights, last.non_trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the last checkpoint's

    # a run stopped between snapshots: its last checkpoint is the newest member
    os.remove(snaps[-1][1])
    card = trainer.export(run, str(tmp_path / 'avg2'), average=2)
    assert card['training']['averaged_snapshots'] == [5, 6]
    assert not os.path.exists(str(tmp_path / 'avg2.tmp.weights.h5'))
    net.load_weights(str(tmp_path / 'avg2.weights.h5'))
    np.testing.assert_allclose(np.asarray(net.trainable_weights[0]),
                               (weights[1][0] + weights[2][0]) / 2, rtol=1e-5, atol=1e-6)

    bare = str(tmp_path / 'bare')
    trainer.Trainer(TrainConfig(**{**cfg.__dict__, 'steps': 1}), bare, progress=False).run()
    with pytest.raises(ValueError, match='nothing to average'):
        trainer.export(bare, str(tmp_path / 'none'), average=3)


def test_sigterm_stops_at_a_step_with_a_checkpoint(tiny_cfg, tmp_path):
    """kill (or Ctrl-C) ends the run at the end of the current step, with a checkpoint of it,
    and the handlers are restored afterwards."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        pytest.skip('signal handlers need the main thread')
    cfg = TrainConfig(**{**tiny_cfg.__dict__, 'steps': 50, 'checkpoint_minutes': 60})
    run = str(tmp_path / 'run')
    t = trainer.Trainer(cfg, run, progress=False)
    calls = []
    encode = t.task.encode

    def encode_then_kill(target):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)       # arrives during step 3
        return encode(target)

    t.task.encode = encode_then_kill
    before = signal.getsignal(signal.SIGTERM)
    t.run()
    assert t.stopped and json.load(open(os.path.join(run, 'state.json')))['step'] == 3
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.path.exists(os.path.join(run, 'ckpt.keras'))


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    run = str(tmp_path / 'run')
    trainer.Trainer(tiny_cfg, run, progress=False)       # writes the run's config.json
    assert os.path.exists(os.path.join(run, 'config.json'))
    other = TrainConfig(**{**tiny_cfg.__dict__, 'learning_rate': 0.5})
    with pytest.raises(ValueError, match='learning_rate'):
        trainer.Trainer(other, run, progress=False)


def test_override_sets_fields_and_task_options():
    cfg = models.preset('synthmorph_deform', ['a', 'b', 'c'])
    before = dict(cfg.task_options)
    override(cfg, 'learning_rate=1e-3')
    override(cfg, 'task_options.lambda_range=[0, 0.5]')
    override(cfg, 'shape=[32,32,32]')
    assert cfg.learning_rate == 1e-3 and cfg.shape == [32, 32, 32]
    assert cfg.task_options['lambda_range'] == [0, 0.5]
    assert {k: v for k, v in cfg.task_options.items() if k != 'lambda_range'} == \
        {k: v for k, v in before.items() if k != 'lambda_range'}
    for bad in ('learning_rate', 'nosuch=1', 'learning_rate.x=1'):
        with pytest.raises(ValueError):
            override(cfg, bad)


def test_run_stops_with_a_checkpoint_when_out_of_time(tiny_cfg, tmp_path):
    run = str(tmp_path / 'run')
    tiny_cfg.steps = 50
    trainer.Trainer(tiny_cfg, run, progress=False).run(max_minutes=0)
    state = json.load(open(os.path.join(run, 'state.json')))
    assert state['step'] == 1 and os.path.exists(os.path.join(run, 'ckpt.keras'))
    assert trainer.read_log(run)[-1]['step'] == '1'


def test_ventricle_erosion_adds_training_variants_but_not_held_out_ones(tiny_cfg, tmp_path):
    maps = []
    for i in range(2):                       # a 14^3 ventricle inside white matter
        a = np.zeros((24, 24, 24), np.int16)
        a[2:22, 2:22, 2:22] = 2
        a[4:18, 4:18, 4:18 - i] = 4
        maps.append(str(tmp_path / ('v%d.nii.gz' % i)))
        nib.save(nib.Nifti1Image(a, np.eye(4)), maps[-1])
    cfg = dataclasses.replace(tiny_cfg, task='synthseg', label_maps=maps,
                              task_options={'ventricle_erosion': [1, 2]})
    task = models.create(cfg)
    bank = task.training_bank(cfg.label_maps)
    assert len(bank) == 3 * len(cfg.label_maps)           # each map, then eroded by 1 and 2
    ventricle = [(m == 4).sum() for m in bank.maps[:3]]
    assert ventricle == [14 ** 3, 12 ** 3, 10 ** 3]
    assert len(task.make_bank(cfg.val_maps)) == len(cfg.val_maps)
    plain = models.create(dataclasses.replace(cfg, task_options={}))
    assert len(plain.training_bank(cfg.label_maps)) == len(cfg.label_maps)


def test_task_options_reject_unknown_names():
    cfg = models.preset('synthmorph_deform', ['a', 'b', 'c'])
    options = models.task_class('synthmorph_deform').Options
    with pytest.raises(ValueError, match='coord_wieght'):
        override(cfg, 'task_options.coord_wieght=0.1', options)
    with pytest.raises(ValueError, match='nonlin_sdt_mm'):
        override(cfg, 'generator.nonlin_sdt_mm=2')
    override(cfg, 'task_options.coord_weight=0.1', options)
    assert cfg.task_options['coord_weight'] == 0.1
    cfg.task_options = {**cfg.task_options, 'coord_wieght': 0.1}     # e.g. an edited config.json
    with pytest.raises(ValueError, match='coord_wieght'):
        models.create(cfg)
    strip = models.preset('synthstrip', ['a', 'b', 'c'])
    strip.task_options = {'csf': True, 'band': 3}
    with pytest.raises(ValueError, match='band'):
        models.create(strip)


def test_every_registered_task_builds_from_its_preset(tmp_path):
    import keras
    from synthkit.task import Task
    # the shared data layout: label_maps/ and fs_subjects/ side by side (the parcellation
    # trains on the subjects' aparc+aseg only)
    maps = [str(tmp_path / 'label_maps' / m) for m in ('m1', 'm2', 'm3', 'm4')]
    for s in ('sub-01', 'sub-02'):
        os.makedirs(tmp_path / 'fs_subjects' / s)
        for f in ('aparc+aseg.mgz', 'T1.mgz'):
            (tmp_path / 'fs_subjects' / s / f).write_bytes(b'')
    for name in models.TASKS:
        cfg = models.preset(name, maps)
        # SynthSR holds out one label map and one real-T1 subject (with an aseg: none here)
        held_out = {'synthsr': ['m4'], 'synthsr_lowfield': ['m4'],
                    'synthparc': ['sub-02']}.get(name, ['m3', 'm4'])
        assert cfg.task == name and [os.path.basename(m) for m in cfg.val_maps] == held_out
        task = models.create(cfg)
        assert isinstance(task, Task) and task.name == name
        assert isinstance(task.architecture()['type'], str) and task.loss_description()
        net = task.network()
        assert isinstance(net, keras.Model)
        if task.network_layer:
            assert net.name == task.network_layer
    with pytest.raises(ValueError, match='unknown task'):
        models.task_class('synthsegg')


def test_learning_curve_of_a_run_without_earlier_points(tmp_path):
    """A run directory written before INIT curves were kept (no state key, no old card)."""
    vals = [{'step': '10', 'val_dice': '0.5'}, {'step': '20', 'val_dice': '0.6'}]
    assert trainer._learning_curve({}, vals, str(tmp_path / 'none.json')) == [(10, 0.5), (20, 0.6)]
    card = tmp_path / 'old.json'
    card.write_text(json.dumps({'training': {'validation_dice_synthetic': [[5, 0.1], [10, 0.4]]}}))
    assert trainer._learning_curve({}, vals, str(card)) == [(5, 0.1), (10, 0.5), (20, 0.6)]


def test_instance_norm_unet_trains_exports_and_each_image_stands_alone(tiny_cfg, tmp_path):
    """norm 'instance': each image normalized by its own statistics, whatever the batch holds,
    in training and at inference alike; the run trains, exports and rebuilds from its card."""
    cfg = nets.UNetConfig(features=4, levels=2, convs_per_level=1, norm='instance')
    net = nets.unet(cfg)
    rng = np.random.default_rng(0)
    a, b = (rng.random((1, 16, 16, 16, 1)).astype(np.float32) for _ in range(2))
    alone = np.asarray(net.predict_on_batch(a))
    together = np.asarray(net.predict_on_batch(np.concatenate([a, 100 * b + 5])))[:1]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    np.testing.assert_allclose(alone, np.asarray(net(a, training=True)), atol=1e-5)
    run_cfg = TrainConfig(**{**tiny_cfg.__dict__, 'unet': cfg.to_dict(), 'steps': 2})
    trainer.Trainer(run_cfg, str(tmp_path / 'run'), progress=False).run()
    card = trainer.export(str(tmp_path / 'run'), str(tmp_path / 'seg'))
    assert card['architecture']['norm'] == 'instance'
    model, _ = nets.load_unet(str(tmp_path / 'seg.weights.h5'), card)
    x = rng.random((1, 16, 16, 16, 1)).astype(np.float32)
    assert np.isfinite(np.asarray(model.predict_on_batch(x))).all()


def test_widen_keeps_the_function_and_then_trains_the_new_channels(tiny_cfg, tmp_path):
    """nets.widen: the wider U-Net computes what the narrow one did (batch norm with moving
    averages and with the image's own statistics alike); a run started with --init from the
    narrow card and a larger unet.features starts from that function and then uses the added
    channels."""
    narrow_cfg = nets.UNetConfig(features=4, levels=3, convs_per_level=2, out_channels=5)
    wide_cfg = dataclasses.replace(narrow_cfg, features=6)
    narrow, wide = nets.unet(narrow_cfg), nets.unet(wide_cfg)
    rng = np.random.default_rng(0)
    for layer in narrow.layers:       # moving statistics and scales away from their defaults
        if layer.get_weights() and not layer.name.endswith(tuple('conv%d' % i for i in range(2))):
            layer.set_weights([w + rng.uniform(0.2, 0.5, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    nets.widen(narrow, wide, narrow_cfg, wide_cfg)
    x = rng.normal(size=(1, 16, 16, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(wide.predict_on_batch(x), narrow.predict_on_batch(x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(wide(x, training=True)),
                               np.asarray(narrow(x, training=True)), atol=1e-5)
    assert wide.count_params() > 2 * narrow.count_params()
    with pytest.raises(ValueError, match='levels differs'):
        nets.widen(narrow, nets.unet(dataclasses.replace(wide_cfg, levels=2)), narrow_cfg,
                   dataclasses.replace(wide_cfg, levels=2))

    # through the trainer: --init a 4-feature card into a 6-feature run
    cfg = TrainConfig(**{**tiny_cfg.__dict__, 'steps': 3})
    trainer.Trainer(cfg, str(tmp_path / 'run'), progress=False).run()
    trainer.export(str(tmp_path / 'run'), str(tmp_path / 'narrow'))
    wide_run = TrainConfig(**{**cfg.__dict__, 'steps': 5,
                              'unet': {**cfg.unet, 'features': 6}})
    t = trainer.Trainer(wide_run, str(tmp_path / 'wide'), progress=False,
                        init=str(tmp_path / 'narrow'))
    model = t.task.build_model()
    t.task.load_init(model, str(tmp_path / 'narrow.weights.h5'),
                     json.load(open(str(tmp_path / 'narrow.json'))))
    small = nets.unet(nets.UNetConfig.from_dict(cfg.unet))
    small.load_weights(str(tmp_path / 'narrow.weights.h5'))
    x = rng.normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(model.predict_on_batch(x), small.predict_on_batch(x), atol=1e-5)
    t.run()
    card = trainer.export(str(tmp_path / 'wide'), str(tmp_path / 'wide_out'))
    assert card['architecture']['features'] == 6 and card['training']['steps'] == 5
    head = nets.unet(nets.UNetConfig.from_dict(card['architecture']))
    head.load_weights(str(tmp_path / 'wide_out.weights.h5'))
    kernel = np.asarray(head.get_layer('head').kernel)
    assert np.abs(kernel[..., 4:, :]).max() > 0     # the added channels now reach the output


def test_bfloat16_run_trains_resumes_and_exports_float32_weights(tiny_cfg, tmp_path):
    """precision 'mixed_bfloat16': the network computes in bfloat16 (its head in float32), the
    weights stay float32, the global policy is float32 again after the run (the generator and
    inference never see bfloat16), the run resumes, the card names the precision, and the
    exported weights load into a float32 network."""
    cfg = TrainConfig(**{**tiny_cfg.__dict__, 'steps': 2, 'precision': 'mixed_bfloat16'})
    run = str(tmp_path / 'run')
    t = trainer.Trainer(cfg, run, progress=False)
    model = t.run()
    assert keras.config.dtype_policy().name == 'float32'
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv3D)]
    assert {c.compute_dtype for c in convs if c.name != 'head'} == {'bfloat16'}
    assert {c.dtype_policy.compute_dtype for c in convs if c.name == 'head'} == {'float32'}
    assert all(w.dtype == 'float32' for w in model.trainable_weights)
    cfg.steps = 3
    trainer.Trainer(cfg, run, progress=False).run()              # resumes
    rows = list(csv.DictReader(open(os.path.join(run, 'log.csv'))))
    assert int(rows[-1]['step']) == 3 and all(np.isfinite(float(r['loss'])) for r in rows)
    card = trainer.export(run, str(tmp_path / 'seg'))
    assert card['training']['devices'][-1][2].endswith(', mixed_bfloat16')
    net, _ = nets.load_unet(str(tmp_path / 'seg.weights.h5'), card)
    assert net.compute_dtype == 'float32'
    x = np.random.default_rng(0).random((1, 16, 16, 16, 1)).astype(np.float32)
    assert np.isfinite(np.asarray(net.predict_on_batch(x))).all()
    with pytest.raises(ValueError, match='precision'):
        trainer.dtype_policy('float16')
