"""synthkit.runtime: the shipped U-Nets on OpenVINO compute what the Keras models compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthkit import labels as lab
from synthkit import nets, predict, runtime

from helpers import seeded

pytest.importorskip('openvino')

ROOT = Path(__file__).resolve().parents[1]


def _card(cfg, norm_statistics='image'):
    return {'task': 'synthseg', 'architecture': {'type': 'unet', **cfg.to_dict()},
            'output_labels': list(lab.SEGMENTATION_LABELS[:cfg.out_channels]),
            'input': {'voxsize_mm': 1.0, 'norm_statistics': norm_statistics},
            'training': {'steps': 0}}


def _net(tmp_path, seed=1, **fields):
    """A random-weight U-Net saved as the tools find one: (weights path, card, Keras model)."""
    cfg = nets.UNetConfig(**{'features': 4, 'levels': 3, 'convs_per_level': 2, **fields})
    model = seeded(nets.unet(cfg), seed)
    # batch norm's scale and offset away from 1 and 0, so that a mix-up of the two shows
    for layer in model.layers:
        if 'norm' in layer.name:
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.3, beta.shape).astype(np.float32), mean, var])
    path = str(tmp_path / 'net.weights.h5')
    model.save_weights(path)
    return path, _card(cfg), model


def _image(shape=(24, 16, 32), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return (3 + 2 * rng.random((1, *shape, channels))).astype(np.float32)


@pytest.mark.parametrize('fields', [{}, {'final_activation': 'linear', 'out_channels': 2},
                                    {'in_channels': 3, 'out_channels': 5, 'levels': 2,
                                     'activation': 'relu'}])
def test_openvino_unet_computes_the_keras_model_in_image_statistics_mode(tmp_path, fields):
    path, card, model = _net(tmp_path, **fields)
    ov_net, cfg = runtime.load_unet(path, card, 'float32', runtime='openvino')
    keras_net, _ = runtime.load_unet(path, card, 'float32', runtime='keras')
    assert isinstance(ov_net, runtime.OpenVINOUNet) and isinstance(keras_net, nets.ImageStatistics)
    assert ov_net.output_shape[-1] == cfg.out_channels
    for shape in [(24, 16, 32), (16, 16, 16), (24, 16, 32)]:   # a new shape, then back
        x = _image(shape, cfg.in_channels, seed=len(shape) + shape[0])
        expected = np.asarray(model(x, training=True))
        got = ov_net.predict_on_batch(x)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-3 * max(1, np.abs(expected).max()), \
            np.abs(got - expected).max()
        assert np.allclose(keras_net.predict_on_batch(x), expected, atol=1e-5)


def test_openvino_results_are_not_overwritten_by_the_next_call(tmp_path):
    path, card, _ = _net(tmp_path)
    net, _ = runtime.load_unet(path, card, 'float32', runtime='openvino')
    a_in, b_in = _image(seed=1), _image(seed=2)
    a = net.predict_on_batch(a_in)
    a_copy = a.copy()
    b = net.predict_on_batch(b_in)
    assert np.array_equal(a, a_copy) and not np.allclose(a, b)
    a[:] = 0                                     # writable, and not the program's buffer
    assert np.array_equal(net.predict_on_batch(b_in), b)


def test_openvino_flip_program_is_the_numpy_flip_average(tmp_path):
    """predict_tiled with a flip: OpenVINO's one program against the same network's two calls
    with numpy mirroring (the fallback every wrapper without flip_program takes)."""
    path, card, _ = _net(tmp_path, in_channels=3, out_channels=5)
    net, _ = runtime.load_unet(path, card, 'float32', runtime='openvino')
    perm = [0, 2, 1, 4, 3]                      # left/right pairs swapped
    x = _image((24, 16, 32), 3, seed=5)[0]
    flip = (0, perm, [0, 2, 1])

    class Plain:                                # the same network, no flip_program of its own
        output_shape = net.output_shape
        predict_on_batch = staticmethod(net.predict_on_batch)
    got = predict.predict_tiled(net, x, tile=64, divisor=4, flip=flip)
    expected = predict.predict_tiled(Plain(), x, tile=64, divisor=4, flip=flip)
    assert np.allclose(got, expected, atol=1e-5)
    unflipped = predict.predict_tiled(net, x, tile=64, divisor=4)
    assert not np.allclose(got, unflipped, atol=1e-3)       # the mirrored pass counted


def test_bfloat16_stays_close_to_float32(tmp_path):
    path, card, _ = _net(tmp_path)
    x = _image()
    f32, _ = runtime.load_unet(path, card, 'float32', runtime='openvino')
    bf16, _ = runtime.load_unet(path, card, 'bfloat16', runtime='openvino')
    assert bf16.precision == 'mixed_bfloat16' and f32.precision == 'float32'
    a, b = f32.predict_on_batch(x), bf16.predict_on_batch(x)
    assert np.abs(a - b).max() < 0.05 and (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_runtime_choice_and_what_openvino_cannot_compute(tmp_path, monkeypatch):
    path, card, _ = _net(tmp_path)
    monkeypatch.setenv('SYNTHKIT_RUNTIME', 'keras')
    assert isinstance(runtime.load_unet(path, card)[0], nets.ImageStatistics)
    monkeypatch.setenv('SYNTHKIT_RUNTIME', 'Auto')
    assert isinstance(runtime.load_unet(path, card)[0], runtime.OpenVINOUNet)
    monkeypatch.setenv('SYNTHKIT_RUNTIME', 'onnx')
    with pytest.raises(ValueError, match='SYNTHKIT_RUNTIME must be one of'):
        runtime.load_unet(path, card)
    monkeypatch.delenv('SYNTHKIT_RUNTIME')
    moving = dict(card, input={'norm_statistics': 'moving'})
    assert 'moving averages' in runtime.supported(moving)
    assert not isinstance(runtime.load_unet(path, moving)[0], runtime.OpenVINOUNet)
    with pytest.raises(ValueError, match='cannot compute this network: batch normalization'):
        runtime.load_unet(path, moving, runtime='openvino')
    assert 'not a plain U-Net' in runtime.supported({'architecture': {'type': 'synthsr_hybrid'}})
    assert runtime.supported(dict(card, architecture=dict(card['architecture'],
                                                          norm='instance'))) is not None


def test_weights_of_another_network_are_refused_in_one_line(tmp_path):
    path, card, _ = _net(tmp_path)
    other = dict(card, architecture=dict(card['architecture'], levels=4))
    with pytest.raises(ValueError, match=r'no U-Net of the card.*in these weights '
                                         r'\(11 convolutions and 5 normalizations'):
        runtime.load_unet(path, other, runtime='openvino')
    wider = dict(card, architecture=dict(card['architecture'], features=8))
    with pytest.raises(ValueError, match='no U-Net of the card'):
        runtime.load_unet(path, wider, runtime='openvino')
    bad = tmp_path / 'bad.weights.h5'
    bad.write_bytes(b'not hdf5')
    with pytest.raises(ValueError, match='bad.weights.h5: cannot read these weights'):
        runtime.load_unet(str(bad), card, runtime='openvino')


def test_mri_synthseg_on_openvino_never_imports_tensorflow(tmp_path):
    """The point of the runtime: the whole command (model found, scan segmented, volumes) with a
    U-Net in image-statistics mode runs without TensorFlow's import, and labels the scan as the
    Keras runtime does."""
    path, card, _ = _net(tmp_path, out_channels=len(lab.SEGMENTATION_LABELS), levels=2)
    card['output_labels'] = list(lab.SEGMENTATION_LABELS)
    models = tmp_path / 'models'
    models.mkdir()
    os.replace(path, models / 'synthseg.weights.h5')
    (models / 'synthseg.json').write_text(json.dumps(card))
    import nibabel as nib
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 34, 28)], indexing='ij'))
    data = np.where((grid ** 2).sum(0) < 0.6, 100.0, 10.0).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / 'in.nii.gz'))
    code = ('import runpy, sys; sys.argv = ["mri_synthseg", "--i", "in.nii.gz", "--o", '
            '"seg_%s.nii.gz", "--vol", "vol.csv", "--threads", "1"]\n'
            'try:\n    runpy.run_path(%r, run_name="__main__")\n'
            'except SystemExit as e:\n    assert not e.code, e.code\n'
            'print("TF", "tensorflow" in sys.modules)')
    outputs = {}
    for name in ('openvino', 'keras'):
        env = dict(os.environ, SYNTHKIT_MODELS=str(models), SYNTHKIT_RUNTIME=name,
                   PYTHONPATH=str(ROOT / 'python'))
        done = subprocess.run([sys.executable, '-c', code % (name, str(ROOT / 'bin' /
                                                                        'mri_synthseg'))],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = done.stdout.split()[-1]
    assert outputs == {'openvino': 'False', 'keras': 'True'}
    a = np.asarray(nib.load(str(tmp_path / 'seg_openvino.nii.gz')).dataobj)
    b = np.asarray(nib.load(str(tmp_path / 'seg_keras.nii.gz')).dataobj)
    assert (a == b).mean() > 0.999 and len(np.unique(a)) > 1


def test_predict_tiled_frees_the_programs_when_the_scan_is_done(tmp_path):
    path, card, _ = _net(tmp_path)
    net, _ = runtime.load_unet(path, card, 'float32', runtime='openvino')
    x = _image((24, 16, 32), seed=3)[0, ..., 0]
    first = predict.predict_tiled(net, x, tile=16, overlap=8, divisor=4)    # several tiles
    assert net._programs == {}
    assert np.array_equal(predict.predict_tiled(net, x, tile=16, overlap=8, divisor=4), first)
    net.predict_on_batch(x[None, ..., None])
    assert len(net._programs) == 1
    with pytest.raises(ValueError, match='multiples of 4'):
        net.predict_on_batch(x[None, :10, ..., None])


def test_float16_inputs_go_in_as_they_are_and_threads_share_a_network(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    path, card, _ = _net(tmp_path, in_channels=3)
    net, _ = runtime.load_unet(path, card, 'float32', runtime='openvino')
    x16 = _image((24, 16, 32), 3, seed=4).astype(np.float16)
    expected = net.predict_on_batch(x16.astype(np.float32))
    got = net.predict_on_batch(x16)
    assert got.dtype == np.float32 and np.allclose(got, expected, atol=1e-5)
    inputs = [_image((16, 16, 16), 3, seed=s) for s in range(6)]
    alone = [net.predict_on_batch(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:         # one request per program: calls serialized
        together = list(pool.map(net.predict_on_batch, inputs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
