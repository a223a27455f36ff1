"""Nipype interfaces of the SynthKit tools, for Nipype / fMRIPrep-style workflows.

Each wraps the command of the same name (which must be on ``PATH``, as ``pip install
synthkit`` puts it) with FreeSurfer's flags; outputs left unset get names derived from the
input, in the node's working directory. Needs the optional extra ``synthkit[nipype]``.

>>> from synthkit.interfaces.nipype import SynthSeg
>>> seg = SynthSeg(in_file='T1.nii.gz', vol='vol.csv', fast=True)
>>> seg.cmdline                                                  # doctest: +SKIP
'mri_synthseg --fast --i T1.nii.gz --o T1_synthseg.nii.gz --vol vol.csv'
"""

import os

try:
    from nipype.interfaces.base import (CommandLine, CommandLineInputSpec, File,
                                        TraitedSpec, isdefined, traits)
except ImportError as e:                                   # pragma: no cover
    raise ImportError('synthkit.interfaces.nipype needs Nipype: pip install synthkit[nipype]') \
        from e


def _outputs(interface, names):
    """``{output: absolute path}`` of the File inputs ``names`` (set or generated)."""
    out = interface._outputs().get()
    for name in names:
        value = getattr(interface.inputs, name)
        if not isdefined(value):
            spec = interface.inputs.trait(name)
            if spec.name_source:
                value = interface._filename_from_source(name)
        if isdefined(value) and value:
            out[name] = os.path.abspath(value)
    return out


class _Tool(CommandLine):
    """A SynthKit command: a non-zero exit fails the node with the tool's one-line error
    (before Nipype looks for outputs that were never written)."""

    def _run_interface(self, runtime, correct_return_codes=(0,)):
        runtime = super()._run_interface(runtime, correct_return_codes)
        if runtime.returncode not in correct_return_codes:
            self.raise_exception(runtime)
        return runtime


# -------------------------------------------------------------------------------- mri_synthseg
class SynthSegInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='--i %s', position=-2,
                   desc='image to segment (any contrast and resolution)')
    out_file = File(argstr='--o %s', position=-1, name_source=['in_file'],
                    name_template='%s_synthseg', keep_extension=True, hash_files=False,
                    desc='segmentation (aseg numbering)')
    vol = File(argstr='--vol %s', hash_files=False, desc='volumes CSV (mm^3 per structure)')
    qc = File(argstr='--qc %s', hash_files=False, desc='QC scores CSV')
    post = File(argstr='--post %s', hash_files=False, desc='posteriors (one frame per label)')
    resample = File(argstr='--resample %s', hash_files=False, desc='input resampled to 1 mm')
    parc = traits.Bool(argstr='--parc', desc='cortical parcellation')
    robust = traits.Bool(argstr='--robust', desc='robust model')
    fast = traits.Bool(argstr='--fast', desc='no flip averaging or post-processing')
    disable_intensity_model = traits.Bool(argstr='--disable_intensity_model',
                                          desc="the network's posteriors alone")
    ct = traits.Bool(argstr='--ct', desc='CT scan: clip to [0, 80]')
    keepgeom = traits.Bool(argstr='--keepgeom', desc='outputs on the input voxel grid')
    crop = traits.List(traits.Int, argstr='--crop %s', minlen=1, maxlen=3, sep=' ',
                       desc='centred crop size(s) in mm')
    png = traits.Bool(argstr='--png', desc='QC picture beside the segmentation')
    threads = traits.Int(1, usedefault=True, argstr='--threads %d', desc='CPU threads')
    cpu = traits.Bool(argstr='--cpu', desc='run on the CPU')
    model = File(exists=True, argstr='--model %s', desc='alternative weights (.weights.h5)')


class SynthSegOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='segmentation')
    vol = File(desc='volumes CSV')
    qc = File(desc='QC scores CSV')
    post = File(desc='posteriors')
    resample = File(desc='input resampled to 1 mm')


class SynthSeg(_Tool):
    """``mri_synthseg``: whole-brain segmentation of a scan of any contrast and resolution."""
    _cmd = 'mri_synthseg'
    input_spec = SynthSegInputSpec
    output_spec = SynthSegOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file', 'vol', 'qc', 'post', 'resample'])


# ------------------------------------------------------------------------------ mri_synthstrip
class SynthStripInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='-i %s', desc='image to strip')
    out_file = File(argstr='-o %s', name_source=['in_file'], name_template='%s_synthstrip',
                    keep_extension=True, hash_files=False, desc='skull-stripped image')
    mask_file = File(argstr='-m %s', hash_files=False, desc='binary brain mask')
    sdt_file = File(argstr='-d %s', hash_files=False, desc='signed distance to the brain (mm)')
    border = traits.Float(argstr='-b %g', desc='mask border threshold in mm (default 1)')
    no_csf = traits.Bool(argstr='--no-csf', desc='exclude CSF from the brain border')
    fill = traits.Float(argstr='--fill %g', desc='value of removed voxels')
    threads = traits.Int(argstr='-t %d', desc='CPU threads')
    gpu = traits.Bool(argstr='-g', desc='run on the GPU')
    model = File(exists=True, argstr='--model %s', desc='alternative weights (.weights.h5)')


class SynthStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='skull-stripped image')
    mask_file = File(desc='brain mask')
    sdt_file = File(desc='signed distance')


class SynthStrip(_Tool):
    """``mri_synthstrip``: skull stripping of any contrast (T1w, T2w, FLAIR, DWI, CT...)."""
    _cmd = 'mri_synthstrip'
    input_spec = SynthStripInputSpec
    output_spec = SynthStripOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file', 'mask_file', 'sdt_file'])


# ------------------------------------------------------------------------------ mri_synthmorph
class SynthMorphRegisterInputSpec(CommandLineInputSpec):
    moving = File(exists=True, mandatory=True, argstr='%s', position=1, desc='moving image')
    fixed = File(exists=True, mandatory=True, argstr='%s', position=2, desc='fixed image')
    model = traits.Enum('joint', 'deform', 'affine', 'rigid', argstr='-m %s',
                        desc='transformation model (default joint)')
    out_file = File(argstr='-o %s', name_source=['moving'], name_template='%s_moved',
                    keep_extension=True, hash_files=False, desc='moving image registered')
    out_fixed = File(argstr='-O %s', hash_files=False, desc='fixed image moved to moving space')
    trans = File(argstr='-t %s', hash_files=False,
                 desc='transform, moving to fixed (.lta or displacement image)')
    inverse = File(argstr='-T %s', hash_files=False, desc='inverse transform')
    init = File(exists=True, argstr='-i %s', desc='initial matrix transform')
    header_only = traits.Bool(argstr='-H', desc='change the header instead of resampling')
    regularization = traits.Float(argstr='-r %g', desc='deformation smoothness in (0, 1)')
    steps = traits.Int(argstr='-n %d', desc='integration steps (at least 5)')
    extent = traits.Enum(256, 192, argstr='-e %d', desc='network grid extent (mm)')
    threads = traits.Int(argstr='-j %d', desc='CPU threads')
    gpu = traits.Bool(argstr='-g', desc='run on the GPU')
    refine = traits.Bool(argstr='--refine', desc='optimize the affine by mutual information')
    no_refine = traits.Bool(argstr='--no-refine', desc='rigid: no mutual-information optimization')
    no_check = traits.Bool(argstr='--no-check',
                           desc="keep the affine network's matrix over the headers' alignment")
    itk = traits.Bool(argstr='--itk', desc='displacement fields in ITK/ANTs layout')


class SynthMorphRegisterOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='moving image registered')
    out_fixed = File(desc='fixed image in moving space')
    trans = File(desc='transform')
    inverse = File(desc='inverse transform')


class SynthMorphRegister(_Tool):
    """``mri_synthmorph register``: affine and deformable registration of any two scans."""
    _cmd = 'mri_synthmorph register'
    input_spec = SynthMorphRegisterInputSpec
    output_spec = SynthMorphRegisterOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file', 'out_fixed', 'trans', 'inverse'])


class SynthMorphApplyInputSpec(CommandLineInputSpec):
    trans = File(exists=True, mandatory=True, argstr='%s', position=1,
                 desc='transform: .lta matrix or displacement field image')
    in_file = File(exists=True, mandatory=True, argstr='%s', position=2, desc='image to move')
    out_file = File(argstr='%s', position=3, name_source=['in_file'],
                    name_template='%s_moved', keep_extension=True, hash_files=False,
                    desc='moved image')
    method = traits.Enum('linear', 'nearest', argstr='-m %s',
                         desc='interpolation (nearest for label maps)')
    dtype = traits.Str(argstr='-t %s', desc='output data type, e.g. float32')
    fill = traits.Float(argstr='-f %g', desc='value outside the input field of view')
    header_only = traits.Bool(argstr='-H', desc='change the header only (matrices)')


class SynthMorphApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='moved image')


class SynthMorphApply(_Tool):
    """``mri_synthmorph apply``: move an image with a transform of ``SynthMorphRegister``."""
    _cmd = 'mri_synthmorph apply'
    input_spec = SynthMorphApplyInputSpec
    output_spec = SynthMorphApplyOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file'])


# ------------------------------------------------------------------- mri_easyreg / mri_easywarp
class EasyRegInputSpec(CommandLineInputSpec):
    ref = File(exists=True, mandatory=True, argstr='--ref %s', desc='reference image')
    flo = File(exists=True, mandatory=True, argstr='--flo %s', desc='floating image')
    ref_seg = File(argstr='--ref_seg %s', name_source=['ref'], name_template='%s_synthseg',
                   keep_extension=True, hash_files=False,
                   desc='reference segmentation (used if it exists, else computed there)')
    flo_seg = File(argstr='--flo_seg %s', name_source=['flo'], name_template='%s_synthseg',
                   keep_extension=True, hash_files=False, desc='floating segmentation')
    ref_reg = File(argstr='--ref_reg %s', hash_files=False, desc='reference moved to floating')
    flo_reg = File(argstr='--flo_reg %s', hash_files=False, desc='floating moved to reference')
    fwd_field = File(argstr='--fwd_field %s', hash_files=False, desc='forward field (RAS)')
    bak_field = File(argstr='--bak_field %s', hash_files=False, desc='backward field (RAS)')
    affine_only = traits.Bool(argstr='--affine_only', desc='affine registration only')
    threads = traits.Int(argstr='--threads %d', desc='CPU threads')


class EasyRegOutputSpec(TraitedSpec):
    ref_seg = File(desc='reference segmentation')
    flo_seg = File(desc='floating segmentation')
    ref_reg = File(desc='reference moved to floating space')
    flo_reg = File(desc='floating moved to reference space')
    fwd_field = File(desc='forward field')
    bak_field = File(desc='backward field')


class EasyReg(_Tool):
    """``mri_easyreg``: segmentation-driven symmetric registration."""
    _cmd = 'mri_easyreg'
    input_spec = EasyRegInputSpec
    output_spec = EasyRegOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['ref_seg', 'flo_seg', 'ref_reg', 'flo_reg', 'fwd_field',
                               'bak_field'])


class EasyWarpInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='--i %s', desc='image to warp')
    field = File(exists=True, mandatory=True, argstr='--field %s', desc='field of mri_easyreg')
    out_file = File(argstr='--o %s', name_source=['in_file'], name_template='%s_warped',
                    keep_extension=True, hash_files=False, desc='warped image')
    nearest = traits.Bool(argstr='--nearest', desc='nearest-neighbour (label maps)')
    threads = traits.Int(argstr='--threads %d', desc='CPU threads')


class EasyWarpOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='warped image')


class EasyWarp(_Tool):
    """``mri_easywarp``: apply a field of ``EasyReg``."""
    _cmd = 'mri_easywarp'
    input_spec = EasyWarpInputSpec
    output_spec = EasyWarpOutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file'])


# ---------------------------------------------------------------------------------- mri_synthsr
class SynthSRInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr='--i %s', desc='scan of any contrast')
    out_file = File(argstr='--o %s', name_source=['in_file'], name_template='%s_synthsr',
                    keep_extension=True, hash_files=False, desc='1 mm T1-like output')
    ct = traits.Bool(argstr='--ct', desc='CT scan')
    disable_sharpening = traits.Bool(argstr='--disable_sharpening', desc='no unsharp masking')
    disable_flipping = traits.Bool(argstr='--disable_flipping', desc='no flip averaging')
    lowfield = traits.Bool(argstr='--lowfield', desc='low-field model (not available yet)')
    model = File(exists=True, argstr='--model %s', desc='weights file (default: shipped)')
    threads = traits.Int(argstr='--threads %d', desc='CPU threads')


class SynthSROutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='1 mm T1-like output')


class SynthSR(_Tool):
    """``mri_synthsr``: super-resolution and contrast transfer to a 1 mm MPRAGE-like T1."""
    _cmd = 'mri_synthsr'
    input_spec = SynthSRInputSpec
    output_spec = SynthSROutputSpec

    def _list_outputs(self):
        return _outputs(self, ['out_file'])
