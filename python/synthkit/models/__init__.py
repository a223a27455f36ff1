"""The models of SynthKit, one package each: its network pieces, training task, inference
pipeline and command line (``synthkit/models/<name>/``).

:data:`TASKS` is the registry of trainable models (``train.py --task NAME``, ``make
train-NAME``): adding a model is one package plus one line here. Tasks are imported on demand,
so listing them costs nothing.
"""

import importlib

#: training task name -> "module:class" of its :class:`synthkit.task.Task`
TASKS = {
    'synthseg': 'synthkit.models.synthseg.task:SegmentationTask',
    'synthstrip': 'synthkit.models.synthstrip.task:DistanceTask',
    'synthstrip_nocsf': 'synthkit.models.synthstrip.task:NoCSFDistanceTask',
    'synthmorph_affine': 'synthkit.models.synthmorph.task:AffineTask',
    'synthmorph_deform': 'synthkit.models.synthmorph.task:DeformTask',
    'synthsr': 'synthkit.models.synthsr.task:SRTask',
    'synthsr_lowfield': 'synthkit.models.synthsr.task:LowFieldSRTask',
    'synthparc': 'synthkit.models.synthparc.task:ParcellationTask',
}


def task_class(name):
    """The Task class registered as ``name``."""
    if name not in TASKS:
        raise ValueError('unknown task %r (known: %s)' % (name, ', '.join(sorted(TASKS))))
    module, cls = TASKS[name].split(':')
    return getattr(importlib.import_module(module), cls)


def create(cfg):
    """The task of a TrainConfig, its options checked."""
    return task_class(cfg.task)(cfg)


def preset(name, maps):
    """The TrainConfig of registered task ``name`` from the training label map paths."""
    return task_class(name).preset(maps)
