"""The tools ``synthkit-batch`` runs, each as an adapter over the tool's own per-scan function.

An adapter knows the tool's batch flags, the outputs of one scan, how to load the network (once
per worker), how to process one scan with it, and how to merge the per-scan results into study
tables. Adapters are small and picklable: Dask ships them to the workers.
"""

import argparse
import os

from .. import io
from ..cli import common


class Tool:
    """One tool's batch behaviour (subclasses fill it in)."""

    name = None            # the command, e.g. 'mri_synthseg'
    short = None           # its study files' prefix, e.g. 'synthseg'
    derived = ()           # suffixes of its outputs (regex), skipped when a folder is the input

    def __init__(self, options=None, **kwargs):
        """``options``: an argparse namespace from :meth:`add_arguments`, or keyword options
        (Python API), missing ones taking the flags' defaults."""
        if options is None:
            parser = argparse.ArgumentParser(add_help=False)
            self.add_arguments(parser)
            options = parser.parse_args([])
            for key, value in kwargs.items():
                if not hasattr(options, key):
                    raise ValueError('%s: unknown option %r' % (self.name, key))
                setattr(options, key, value)
        self.options = options
        self.check()

    @classmethod
    def add_arguments(cls, parser):
        """The tool's flags, as given to synthkit-batch after the tool's name."""

    def check(self):
        """Refuse options that cannot work, before any scan is sent (raise ToolError)."""

    def signature(self):
        """The options that change the outputs: a run with other ones recomputes every scan."""
        return {}

    def outputs(self, scan):
        """``{name: path}`` of one scan's outputs, the main one first, ``png`` its QC thumbnail."""
        raise NotImplementedError

    def inputs(self):
        """Files every scan reads besides its image (model, template): never outputs."""
        return [getattr(self.options, 'model', None)]

    def cache_key(self):
        """Scans of adapters with the same key share one loaded network in a worker."""
        return (self.name, getattr(self.options, 'model', None))

    def load(self):
        """The network(s), loaded once per worker process."""
        raise NotImplementedError

    def process(self, model, scan, outputs):
        """Process one scan, writing ``outputs``; returns its metrics (JSON-serializable)."""
        raise NotImplementedError

    def study_tables(self, root, records):
        """Write the merged per-study tables of the finished ``records``; returns their paths."""
        return []

    def measures(self, record):
        """``{name: value}`` of one finished scan, for outlier z-scores in the report."""
        return {}

    def qc_score(self, record):
        """One number in [0, 1] summarising the scan's quality (None if the tool has none)."""
        return None


class SynthSeg(Tool):
    name, short = 'mri_synthseg', 'synthseg'
    derived = ('_synthseg', '_posteriors', '_resampled', '_desc-synthseg.*')

    @classmethod
    def add_arguments(cls, p):
        g = p.add_argument_group('mri_synthseg options')
        g.add_argument('--parc', action='store_true',
                       help='cortical parcellation (68 Desikan-Killiany parcels)')
        g.add_argument('--robust', action='store_true', help='robust model (not available)')
        g.add_argument('--v1', action='store_true', help='SynthSeg 1.0 model (not available)')
        g.add_argument('--fast', action='store_true', help='no flip averaging, no post-processing')
        g.add_argument('--disable_intensity_model', action='store_true',
                       help="the network's posteriors alone, without the per-scan intensity "
                            "model")
        g.add_argument('--vol', action='store_true',
                       help='also a volumes CSV per scan (the study CSV is always written)')
        g.add_argument('--qc', action='store_true',
                       help='also a QC CSV per scan (the study CSV is always written)')
        g.add_argument('--post', action='store_true', help='also write the posteriors per scan')
        g.add_argument('--resample', action='store_true', help='also write the 1 mm input')
        g.add_argument('--crop', type=int, nargs='+', metavar='N', help='centred crop (mm)')
        g.add_argument('--ct', action='store_true', help='CT scans: clip to [0, 80]')
        g.add_argument('--keepgeom', action='store_true', help='outputs on the input grid')
        g.add_argument('--model', metavar='WEIGHTS', help='weights file (default: shipped)')
        g.add_argument('--parc_model', metavar='WEIGHTS',
                       help='parcellation weights file (default: shipped)')

    def check(self):
        from ..models.synthseg import cli
        o = self.options
        for flag, what in (('robust', 'the robust model'), ('v1', 'the SynthSeg 1.0 model')):
            if getattr(o, flag):
                raise common.ModelUnavailable('--%s: model not yet available (%s)' % (flag, what))
        if o.crop and len(o.crop) not in (1, 3):
            raise common.ToolError('--crop takes 1 or 3 sizes')
        if o.crop and not all(16 <= c <= 1000 for c in o.crop):
            raise common.ToolError('--crop sizes must be 16 to 1000 mm')
        if o.parc_model and not o.parc:
            raise common.ToolError('--parc_model needs --parc')
        self.weights = common.find_model('synthseg', o.model)[0]   # ModelUnavailable now
        self.parc = cli.find_parcellation(o.parc_model) if o.parc else None

    def cache_key(self):
        o = self.options
        return (self.name, o.model, o.parc, o.parc_model)

    def signature(self):
        o = self.options
        # results made before the intensity model (no such key) are made again
        sig = {'fast': o.fast, 'crop': o.crop, 'ct': o.ct, 'keepgeom': o.keepgeom,
               'model': _model_id(self.weights),
               'intensity_model': not o.disable_intensity_model}
        if self.parc:           # only then: the results of earlier runs stay valid
            sig['parc'] = _model_id(self.parc[0])
        return sig

    def outputs(self, scan):
        # the thumbnail's name is the one segment_one gives it: common.png_beside(seg)
        o = self.options
        out = {'seg': scan.output('_synthseg', 'synthseg', 'dseg')}
        if o.post:
            out['post'] = scan.output('_posteriors', 'synthseg', 'probseg')
        if o.resample:
            out['resample'] = scan.output('_resampled', 'resampled', None)
        if o.vol:
            out['vol'] = scan.output('_synthseg_vol', 'synthsegvol', 'dseg', '.csv')
        if o.qc:
            out['qc'] = scan.output('_synthseg_qc', 'synthsegqc', 'dseg', '.csv')
        out['png'] = scan.output('_synthseg', 'synthseg', 'dseg', '.png')
        return out

    def load(self):
        from ..models.synthseg.inference import Segmenter
        weights, card = common.find_model('synthseg', self.options.model)
        parc = None
        if self.parc:              # (weights, card), found by check()
            from ..models.synthparc.inference import Parcellator
            parc = Parcellator(*self.parc)
        seg = Segmenter(weights, card)
        seg.intensity_model = not self.options.disable_intensity_model
        return seg, parc

    def process(self, model, scan, outputs):
        from ..models.synthseg import cli
        seg, parc = model
        o = self.options
        args = argparse.Namespace(crop=o.crop, ct=o.ct, fast=o.fast, keepgeom=o.keepgeom,
                                  png=True)        # the thumbnail: outputs['png']
        volumes, qc = cli.segment_one(seg, args, scan.path, outputs['seg'], outputs.get('post'),
                                      outputs.get('resample'), parc)
        if o.vol:
            cli.write_volumes_csv(outputs['vol'], [(scan.id, volumes)],
                                  cli.output_labels(seg, parc))
        if o.qc:
            cli.write_qc_csv(outputs['qc'], [(scan.id, qc)])
        return {'volumes': {str(k): float(v) for k, v in volumes.items()},
                'qc': {k: float(v) for k, v in qc.items()}}

    def study_tables(self, root, records):
        from ..models.synthseg import cli
        if not records:
            return []
        labels = [int(k) for k in records[0]['metrics']['volumes']]
        vol_csv = os.path.join(root, 'synthseg_volumes.csv')
        qc_csv = os.path.join(root, 'synthseg_qc.csv')
        cli.write_volumes_csv(vol_csv, [(r['scan'], {int(k): v for k, v in
                                                     r['metrics']['volumes'].items()})
                                        for r in records], labels)
        cli.write_qc_csv(qc_csv, [(r['scan'], r['metrics']['qc']) for r in records])
        return [vol_csv, qc_csv]

    def measures(self, record):
        from .. import labels as lab
        vols = {int(k): v for k, v in record['metrics']['volumes'].items()}
        out = {'total intracranial': sum(v for k, v in vols.items() if 0 < k < 1000)}
        out.update((lab.SYNTHSEG_NAMES.get(k, lab.name(k)), v) for k, v in vols.items() if k != 0)
        return out

    def qc_score(self, record):
        scores = list(record['metrics']['qc'].values())
        return min(scores) if scores else None


def _model_id(weights):
    """A model's identity for the signature: the weights file's path, size and mtime."""
    st = os.stat(weights)
    return '%s:%d:%d' % (os.path.abspath(weights), st.st_size, int(st.st_mtime))


class SynthStrip(Tool):
    name, short = 'mri_synthstrip', 'synthstrip'
    derived = ('_synthstrip', '_brainmask', '_sdt', '_desc-brain.*', '_desc-sdt.*')

    @classmethod
    def add_arguments(cls, p):
        g = p.add_argument_group('mri_synthstrip options')
        g.add_argument('--no-csf', action='store_true', help='exclude CSF from the brain border')
        g.add_argument('--border', type=float, default=1.0, metavar='MM',
                       help='mask border threshold in mm (default: %(default)s)')
        g.add_argument('--fill', type=float, default=0.0, metavar='VALUE',
                       help='value of removed voxels (default: %(default)s)')
        g.add_argument('--no-image', action='store_true', help='do not write stripped images')
        g.add_argument('--no-mask', action='store_true', help='do not write brain masks')
        g.add_argument('--sdt', action='store_true', help='also write the signed distance (mm)')
        g.add_argument('--model', metavar='WEIGHTS', help='weights file (default: shipped)')

    def _model_name(self):
        return 'synthstrip_nocsf' if self.options.no_csf else 'synthstrip'

    def check(self):
        import math
        o = self.options
        if not (math.isfinite(o.border) and math.isfinite(o.fill)):
            raise common.ToolError('--border and --fill must be finite numbers')
        if o.no_image and o.no_mask and not o.sdt:
            raise common.ToolError('--no-image and --no-mask leave nothing to write (add --sdt)')
        self.weights = common.find_model(self._model_name(), o.model,
                                         tasks=('synthstrip', 'synthstrip_nocsf'))[0]

    def cache_key(self):
        return (self.name, self._model_name(), self.options.model)

    def signature(self):
        o = self.options
        return {'border': o.border, 'fill': o.fill,
                'model': _model_id(self.weights)}

    def outputs(self, scan):
        o = self.options
        out = {}
        if not o.no_image:
            out['image'] = scan.output('_synthstrip', 'brain', None)
        if not o.no_mask:
            out['mask'] = scan.output('_brainmask', 'brain', 'mask')
        if o.sdt:
            out['sdt'] = scan.output('_sdt', 'sdt', None)
        out['png'] = scan.output('_synthstrip', 'brain', 'mask', '.png')
        return out

    def load(self):
        from ..models.synthstrip.inference import Stripper
        weights, card = common.find_model(self._model_name(), self.options.model,
                                          tasks=('synthstrip', 'synthstrip_nocsf'))
        return Stripper(weights, card)

    def process(self, net, scan, outputs):
        from ..models.synthstrip import cli
        o = self.options
        vol = io.load_volume(scan.path)
        if outputs.get('image'):
            cli.check_fill(vol, o.fill)
        litres = cli.strip_one(net, vol, outputs.get('image'), outputs.get('mask'),
                               outputs.get('sdt'), border=o.border, fill=o.fill,
                               png=outputs['png'])
        return {'brain_cm3': litres * 1000}

    def study_tables(self, root, records):
        path = os.path.join(root, 'synthstrip_volumes.csv')
        io.save_csv(path, ['subject', 'brain volume (cm^3)'],
                    [[r['scan'], '%.1f' % r['metrics']['brain_cm3']] for r in records])
        return [path]

    def measures(self, record):
        return {'brain volume': record['metrics']['brain_cm3']}


class SynthSR(Tool):
    name, short = 'mri_synthsr', 'synthsr'
    derived = ('_synthsr', '_desc-synthsr.*')

    @classmethod
    def add_arguments(cls, p):
        g = p.add_argument_group('mri_synthsr options')
        g.add_argument('--ct', action='store_true', help='CT scans: clip to 0-80 HU')
        g.add_argument('--disable_sharpening', action='store_true', help='no unsharp masking')
        g.add_argument('--disable_flipping', action='store_true', help='no flip averaging')
        g.add_argument('--lowfield', action='store_true',
                       help='the low-field variant (models/synthsr_lowfield)')
        g.add_argument('--model', metavar='WEIGHTS', help='weights file (default: shipped)')

    def check(self):
        from ..models.synthsr.cli import find_model
        self.weights, self.card = find_model(self.options.lowfield, self.options.model)
        # the hybrid renders from mri_synthseg's posteriors: its weights are part of the result
        self.seg_weights = None
        if self.card.get('architecture', {}).get('type') == 'synthsr_hybrid':
            self.seg_weights = common.find_model('synthseg')[0]

    def signature(self):
        o = self.options
        return {'ct': o.ct, 'sharpening': not o.disable_sharpening,
                'flipping': not o.disable_flipping, 'model': _model_id(self.weights),
                'synthseg': _model_id(self.seg_weights) if self.seg_weights else None}

    def outputs(self, scan):
        # the thumbnail's name is the one synthesize_one gives it: common.png_beside(image)
        return {'image': scan.output('_synthsr', 'synthsr', 'T1w'),
                'png': scan.output('_synthsr', 'synthsr', 'T1w', '.png')}

    def load(self):
        from ..models.synthsr.inference import Synthesizer
        return Synthesizer(self.weights, self.card)

    def process(self, sr, scan, outputs):
        from ..models.synthsr import cli
        o = self.options
        args = argparse.Namespace(ct=o.ct, disable_sharpening=o.disable_sharpening,
                                  disable_flipping=o.disable_flipping, crop=None, png=True)
        cli.synthesize_one(sr, args, scan.path, outputs['image'])
        return {}


TOOLS = {t.name: t for t in (SynthSeg, SynthStrip, SynthSR)}
NOT_BATCHED = {
    'mri_synthmorph': 'registration takes pairs: run mri_synthmorph register per pair',
    'mri_easyreg': 'registration takes pairs: run mri_easyreg per pair',
}


def get(name, options=None, **kwargs):
    """The adapter of tool ``name`` (``mri_synthseg`` or ``synthseg``) with its options."""
    key = name if name.startswith('mri_') else 'mri_' + name
    if key in NOT_BATCHED:
        raise common.ToolError('%s: %s' % (key, NOT_BATCHED[key]))
    if key not in TOOLS:
        raise common.ToolError('unknown tool %r (batch tools: %s)' % (name, ', '.join(TOOLS)))
    return TOOLS[key](options, **kwargs)
