"""Nipype interfaces: the command lines they build, and real runs of SynthSeg and SynthStrip
(tiny random-weight models) inside a Nipype workflow."""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import nets
from synthkit import labels as lab

nipype = pytest.importorskip('nipype')
ni = pytest.importorskip('synthkit.interfaces.nipype')


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Tiny models, the tools' folder on PATH, a phantom scan; runs in tmp_path."""
    folder = tmp_path / 'models'
    folder.mkdir()
    seg = nets.UNetConfig(features=4, levels=2, convs_per_level=1)
    seeded(nets.unet(seg), 1).save_weights(str(folder / 'synthseg.weights.h5'))
    (folder / 'synthseg.json').write_text(json.dumps({
        'task': 'synthseg', 'architecture': {'type': 'unet', **seg.to_dict()},
        'output_labels': list(lab.SEGMENTATION_LABELS), 'input': {'voxsize_mm': 2.0}}))
    strip = nets.UNetConfig(out_channels=1, final_activation='linear', features=4, levels=2,
                            convs_per_level=1)
    seeded(nets.unet(strip), 2).save_weights(str(folder / 'synthstrip.weights.h5'))
    (folder / 'synthstrip.json').write_text(json.dumps({
        'task': 'synthstrip', 'architecture': {'type': 'unet', **strip.to_dict()},
        'input': {'voxsize_mm': 2.0}, 'target': {'band_mm': 8.0}}))
    monkeypatch.setenv('SYNTHKIT_MODELS', str(folder))
    monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    monkeypatch.chdir(tmp_path)
    shape = (36, 40, 32)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    data = np.where((grid ** 2).sum(0) < 0.5, 100.0, 8.0).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / 'T1.nii.gz'))
    return tmp_path


def test_command_lines(env):
    seg = ni.SynthSeg(in_file='T1.nii.gz', vol='vol.csv', fast=True, crop=[160, 160, 192])
    assert seg.cmdline == ('mri_synthseg --crop 160 160 192 --fast --threads 1 --vol vol.csv '
                           '--i T1.nii.gz --o T1_synthseg.nii.gz')
    strip = ni.SynthStrip(in_file='T1.nii.gz', mask_file='mask.nii.gz', no_csf=True)
    assert strip.cmdline == ('mri_synthstrip -i T1.nii.gz -m mask.nii.gz --no-csf '
                             '-o T1_synthstrip.nii.gz')
    reg = ni.SynthMorphRegister(moving='T1.nii.gz', fixed='T1.nii.gz', model='affine',
                                trans='aff.lta')
    assert reg.cmdline == ('mri_synthmorph register T1.nii.gz T1.nii.gz -m affine '
                           '-o T1_moved.nii.gz -t aff.lta')
    reg = ni.SynthMorphRegister(moving='T1.nii.gz', fixed='T1.nii.gz', trans='w.nii.gz',
                                itk=True, refine=True)
    assert '--itk' in reg.cmdline.split() and '--refine' in reg.cmdline.split()
    open('aff.lta', 'w').close()
    app = ni.SynthMorphApply(trans='aff.lta', in_file='T1.nii.gz', method='nearest')
    assert app.cmdline == 'mri_synthmorph apply aff.lta T1.nii.gz T1_moved.nii.gz -m nearest'
    ez = ni.EasyReg(ref='T1.nii.gz', flo='T1.nii.gz', fwd_field='f.nii.gz')
    assert '--ref_seg T1_synthseg.nii.gz' in ez.cmdline and '--fwd_field f.nii.gz' in ez.cmdline
    assert ni.SynthSR(in_file='T1.nii.gz').cmdline == \
        'mri_synthsr --i T1.nii.gz --o T1_synthsr.nii.gz'


def test_a_workflow_strips_then_segments(env):
    from nipype import Node, Workflow
    strip = Node(ni.SynthStrip(in_file=str(env / 'T1.nii.gz'), mask_file='mask.nii.gz'),
                 name='strip')
    seg = Node(ni.SynthSeg(vol='vol.csv', fast=True), name='seg')
    wf = Workflow(name='wf', base_dir=str(env / 'work'))
    wf.connect(strip, 'out_file', seg, 'in_file')
    result = wf.run()
    nodes = {n.name: n for n in result.nodes()}
    out = nodes['seg'].result.outputs
    assert os.path.isfile(out.out_file) and out.out_file.endswith('T1_synthstrip_synthseg.nii.gz')
    with open(out.vol) as f:
        assert f.readline().startswith('subject,total intracranial')
    # (Nipype removes the unconnected mask from the node's folder); on its own, it is kept
    res = ni.SynthStrip(in_file=str(env / 'T1.nii.gz'), mask_file='mask.nii.gz').run()
    assert res.outputs.mask_file == str(env / 'mask.nii.gz') and os.path.isfile(env / 'mask.nii.gz')
    assert os.path.isfile(res.outputs.out_file)


def test_a_failing_tool_fails_the_node(env):
    with open('bad.nii.gz', 'wb') as f:
        f.write(b'not an image')
    with pytest.raises(RuntimeError, match='not a readable image'):
        ni.SynthSeg(in_file='bad.nii.gz').run()
