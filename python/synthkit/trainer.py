"""A resumable training loop for any :class:`synthkit.task.Task`, checkpoints and model cards.

A run lives in one directory::

    RUN/config.json     the TrainConfig (written once; a resumed run must match it)
    RUN/ckpt.keras      model + optimizer state, rewritten atomically every few minutes
    RUN/state.json      the step reached and wall time spent so far
    RUN/log.csv         step, loss, time, and validation Dice when measured
    RUN/snapshots/      the exported network's weights at some checkpoints
                        (``snapshot_every``), the last ``snapshot_keep`` kept, for an
                        export averaging the last few (``export(..., average=K)``)

``Trainer(cfg, run_dir).run()`` starts or resumes; ``export`` writes the shipped weights and a
model card. What is trained (network, data, loss, score) is the task's, found in the registry
:mod:`synthkit.models` by ``cfg.task``. Works on any Keras backend (TensorFlow here; JAX or
PyTorch on a GPU machine).
"""

import csv
import datetime
import json
import os
import platform
import signal
import threading
import time

import keras
import numpy as np

from . import backend, models, nets
from .task import TrainConfig, override  # noqa: F401  (the names training scripts use)


def _atomic_json(obj, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, default=list)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """Train the network of ``cfg.task`` on synthetic data; resumable from ``run_dir``."""

    def __init__(self, cfg, run_dir, progress=True, init=None, snapshot_every=0,
                 snapshot_keep=10):
        """``init``: prefix of shipped weights (``PREFIX.weights.h5`` + card) to start a new run
        from, continuing the card's step count: how training resumes in a fresh clone, where
        only the shipped weights are committed (the optimizer state starts afresh).
        ``snapshot_every`` (steps, 0: none): at the first checkpoint that many steps after the
        last snapshot, also keep the exported network's weights in ``RUN/snapshots/`` (the last
        ``snapshot_keep`` of them), for an export that averages them."""
        self.cfg, self.run_dir, self.progress, self.init = cfg, run_dir, progress, init
        self.snapshot_every, self.snapshot_keep = int(snapshot_every), int(snapshot_keep)
        self.task = models.create(cfg)
        os.makedirs(run_dir, exist_ok=True)
        self.ckpt = os.path.join(run_dir, 'ckpt.keras')
        self.state_path = os.path.join(run_dir, 'state.json')
        self.log_path = os.path.join(run_dir, 'log.csv')
        self._earlier = []       # validation curve of the INIT weights (before this run's log)
        cfg_path = os.path.join(run_dir, 'config.json')
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            new = json.loads(json.dumps(cfg.to_dict(), default=list))
            default = json.loads(json.dumps(TrainConfig().to_dict(), default=list))
            diff = sorted(k for k in new if k not in ('steps', 'checkpoint_minutes')
                          and old.get(k, default[k]) != new[k])
            if diff:
                raise ValueError('%s was started with a different config (%s); use a new run '
                                 'directory' % (run_dir, ', '.join(diff)))
        _atomic_json(cfg.to_dict(), cfg_path)

    def _state(self):
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                return json.load(f)
        return {'step': 0, 'seconds': 0.0}

    def run(self, max_minutes=None, workers=0):
        """Train to ``cfg.steps``, or until ``max_minutes`` of wall time have passed (then
        checkpoint and return: a time budget, e.g. a lent GPU machine's). ``workers`` > 0
        samples the synthetic batches in that many CPU processes (a GPU machine: the network
        trains on the GPU while its CPU cores generate the data). SIGTERM or SIGINT (Ctrl-C,
        ``kill``) stops it at the end of the current step with a checkpoint: nothing trained
        is lost."""
        self._stop = False
        handlers = {}
        #: whether the last run() ended on a signal (before its steps were done)
        self.stopped = False
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                self._stop = True
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, stop)
        try:
            model = self._run(max_minutes, workers)
            self.stopped = self._stop
            return model
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _run(self, max_minutes, workers):
        # the networks are built (or reloaded) under the run's precision; the generator and
        # anything built later stay float32
        with dtype_policy(self.cfg.precision):
            model, state, start = self._model()
        cfg = self.cfg
        # where the steps were trained: [first step, last step, device] of earlier sessions,
        # and this session's first step and device (each checkpoint extends it)
        self._devices = state.get('devices') or []
        self._earlier = state.get('earlier_validation') or []   # the INIT card's curve
        self._session = (start, device_description(cfg.precision))
        return self._loop(model, state, start, max_minutes, workers)

    def _model(self):
        """(model, state, first step): the checkpoint's, the INIT weights', or a new one."""
        state = self._state()
        start = state['step']
        if start > 0 and os.path.exists(self.ckpt):
            model = self.task.load_checkpoint(self.ckpt)
            print('resuming %s at step %d' % (self.run_dir, start), flush=True)
        elif self.init:
            model = self.task.build_model()
            with open(self.init + '.json') as f:
                card = json.load(f)
            self.task.load_init(model, self.init + '.weights.h5', card)
            done = card['training']
            start = int(done['steps'])
            state = {'step': start, 'seconds': 3600.0 * float(done['hours']),
                     'devices': done.get('devices') or ([[0, start, done['device']]]
                                                        if done.get('device') else []),
                     'earlier_validation': done.get('validation_dice_synthetic') or []}
            print('starting %s from %s at step %d' % (self.run_dir, self.init, start), flush=True)
        else:
            model, start = self.task.build_model(), 0
        return model, state, start

    def _loop(self, model, state, start, max_minutes, workers):
        cfg = self.cfg
        if start >= cfg.steps:
            return model
        val = self.task.validation_set()
        feed = SamplingProcesses(self.task, start, workers) if workers else None
        if feed is None:     # sampling processes hold their own training data
            bank = self.task.training_bank(cfg.label_maps)
            sampler, rng = self.task.stream(start)
        new_log = not os.path.exists(self.log_path)
        logf = open(self.log_path, 'w' if new_log else 'a', newline='')
        log = csv.writer(logf)
        if new_log:
            log.writerow(['step', 'loss', 'seconds', 'val_dice'])
        last_ckpt, t0, seconds0 = time.time(), time.time(), state['seconds']
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, unit='step', mininterval=10)
        losses = []
        for step in range(start + 1, cfg.steps + 1):
            if feed is None:
                x, t = self.task.batch(sampler, bank, rng, cfg.batch_size)
            else:
                x, t = feed.get()
            y = self.task.encode(t)
            # several outputs: [total, per-output losses...]; the total is logged
            loss = float(np.ravel(np.asarray(model.train_on_batch(x, y)))[0])
            losses.append(loss)
            vd = ''
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                vd = '%.4f' % self.task.validate(model, val)
            out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes \
                or self._stop
            if step % 10 == 0 or vd or step == cfg.steps or out_of_time:
                log.writerow([step, '%.4f' % np.mean(losses), '%.0f' % (seconds0 + time.time() - t0),
                              vd])
                logf.flush()
                losses = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss='%.3f' % loss, refresh=False)
            if time.time() - last_ckpt > 60 * cfg.checkpoint_minutes or step == cfg.steps \
                    or out_of_time:
                self.save(model, step, seconds0 + time.time() - t0)
                last_ckpt = time.time()
            if out_of_time:
                print('stopped at step %d after %.1f min%s' % (
                    step, (time.time() - t0) / 60, ' (signal)' if self._stop else ''),
                    flush=True)
                break
        logf.close()
        if feed is not None:
            feed.close()
        if bar is not None:
            bar.close()
        return model

    def save(self, model, step, seconds):
        tmp = self.ckpt + '.tmp.keras'
        model.save(tmp)
        os.replace(tmp, self.ckpt)
        if self.snapshot_every:
            self.snapshot(model, step)
        first, device = self._session
        devices = merge_devices(self._devices + [[first, step, device]])
        _atomic_json({'step': step, 'seconds': seconds, 'devices': devices,
                      'earlier_validation': self._earlier,
                      'saved': datetime.datetime.now().isoformat(timespec='seconds')},
                     self.state_path)

    def snapshot(self, model, step):
        """Keep the exported network's weights at ``step`` if ``snapshot_every`` steps have
        passed since the last snapshot (or at the end of the run); drop the oldest beyond
        ``snapshot_keep``."""
        done = snapshots(self.run_dir)
        last = done[-1][0] if done else -self.snapshot_every
        if step - last < self.snapshot_every and step != self.cfg.steps:
            return
        folder = os.path.join(self.run_dir, 'snapshots')
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'step_%07d.weights.h5' % step)
        tmp = path[:-len('.weights.h5')] + '.tmp.weights.h5'
        self.task.exported_network(model).save_weights(tmp)
        os.replace(tmp, path)
        for _, old in snapshots(self.run_dir)[:-max(self.snapshot_keep, 1)]:
            os.remove(old)


def snapshots(run_dir):
    """[(step, path)] of the weight snapshots of a run, oldest first."""
    folder = os.path.join(run_dir, 'snapshots')
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        if name.startswith('step_') and name.endswith('.weights.h5') and '.tmp.' not in name:
            try:
                found.append((int(name[5:-len('.weights.h5')]), os.path.join(folder, name)))
            except ValueError:
                continue
    return sorted(found)


def average_snapshots(net, paths):
    """Load into ``net`` the mean of the trainable weights of the snapshot files ``paths``
    (the non-trainable ones, e.g. batch-norm statistics or a frozen sub-network, are those of
    the last file): stochastic weight averaging over the end of a run."""
    total = None
    for path in paths:
        nets.load_weights(net, path)
        values = [np.asarray(v, np.float64) for v in net.trainable_weights]
        total = values if total is None else [a + b for a, b in zip(total, values)]
    for var, value in zip(net.trainable_weights, total):
        var.assign((value / len(paths)).astype(var.dtype))
    return net


# the precision helpers live in backend (inference uses them too); their names here as before
PRECISIONS, dtype_policy = backend.PRECISIONS, backend.dtype_policy
bfloat16_hardware, accelerator = backend.bfloat16_hardware, backend.accelerator


def processor_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what :mod:`platform` knows: sessions
    get different machines, and their timings differ."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(precision='float32'):
    """This machine as model cards name it: processor, CPU cores, Keras backend, and the
    accelerator the backend uses, if any (and the precision, when not float32)."""
    text = '%s, %d CPU cores, Keras %s backend' % (processor_name(), os.cpu_count(),
                                                   keras.backend.backend())
    device = accelerator()
    return text + (', ' + device if device else '') + \
        ('' if precision == 'float32' else ', ' + precision)


def merge_devices(devices):
    """[first step, last step, device] records with consecutive records of one device
    merged."""
    merged = []
    for first, last, dev in devices:
        if merged and merged[-1][2] == dev and merged[-1][1] >= first:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last, dev])
    return merged


def describe_devices(devices):
    """One line from a run's [first step, last step, device] records:
    'steps 0-2656: A; steps 2656-15544: B'."""
    return '; '.join('steps %d-%d: %s' % tuple(m) for m in merge_devices(devices))


def _sampling_process(cfg, start, worker, queue):
    """Body of one sampling process: batches ``(x, target)`` of the stream (``start``,
    ``worker``) into ``queue``, before ``task.prepare``, until killed."""
    task = models.create(cfg)
    bank = task.training_bank(cfg.label_maps)
    sampler, rng = task.stream(start, worker)
    while True:
        queue.put(task.batch(sampler, bank, rng, cfg.batch_size, raw=True))


class SamplingProcesses:
    """``n`` processes generating training batches on the CPU (one thread each, the
    accelerator hidden from them); ``get()`` returns the next prepared batch."""

    #: environment of the sampling processes: CPU only, one compute thread
    ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
           'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1',
           'OMP_NUM_THREADS': '1', 'TF_NUM_INTRAOP_THREADS': '1', 'TF_NUM_INTEROP_THREADS': '1',
           'TF_CPP_MIN_LOG_LEVEL': '3'}

    def __init__(self, task, start, n):
        import multiprocessing
        ctx = multiprocessing.get_context('spawn')
        self.task = task
        self.queue = ctx.Queue(maxsize=2 * n)
        saved = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update(self.ENV)
        try:
            self.procs = [ctx.Process(target=_sampling_process,
                                      args=(task.cfg, start, i, self.queue), daemon=True)
                          for i in range(n)]
            for proc in self.procs:
                proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def get(self):
        import queue
        while True:
            try:
                x, t = self.queue.get(timeout=60)
                break
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    raise RuntimeError('all sampling processes have stopped')
        return self.task.prepare(x), t

    def close(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)


def read_log(run_dir):
    """Rows of a run's log.csv as dicts."""
    with open(os.path.join(run_dir, 'log.csv')) as f:
        return list(csv.DictReader(f))


def _learning_curve(state, vals, card_path):
    """``[(step, validation Dice)]`` of the whole training: this run's log, after the curve of
    the weights it started from (``INIT``: kept in its state, else read from the card being
    replaced) for the steps before the log's first."""
    curve = [(int(r['step']), float(r['val_dice'])) for r in vals]
    earlier = state.get('earlier_validation') or []
    if not earlier and os.path.exists(card_path):
        with open(card_path) as f:
            earlier = json.load(f).get('training', {}).get('validation_dice_synthetic') or []
    first = curve[0][0] if curve else float('inf')
    return [(int(s), float(v)) for s, v in earlier if s < first] + curve


def _old_notes(card_path):
    if os.path.exists(card_path):
        with open(card_path) as f:
            return json.load(f).get('notes', '')
    return ''


def compare_norm_statistics(task, model):
    """Mean validation score of ``model`` on the task's held-out synthetic pairs with batch-norm
    running averages ('moving') and with each image's own statistics ('image')."""
    pairs = task.validation_set()
    net = model.get_layer(task.network_layer) if task.network_layer else model
    return {'moving': task.validate(net, pairs),
            'image': task.validate(nets.ImageStatistics(net), pairs)}


def export(run_dir, prefix, scores=None, notes=None, label_dir=None, average=0):
    """Write ``PREFIX.weights.h5`` (the weights of the last checkpoint) and the
    model card ``PREFIX.json`` (architecture, training run, devices, scores). ``notes``
    default: those of the card already at ``PREFIX.json`` (its scores are dropped: they were
    measured on other weights). ``average`` > 1: the mean of the run's last ``average`` weight
    snapshots instead (see :class:`Trainer`; the card lists their steps).

    With ``label_dir`` (where the run's held-out maps are), the card's
    ``input.norm_statistics`` is whichever batch-norm mode scores better on them (tasks whose
    networks have batch norm)."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    config = TrainConfig.from_dict(cfg)
    if label_dir:
        config.val_maps = [os.path.join(label_dir, name) for name in config.val_maps]
    task = models.create(config)
    model = task.load_checkpoint(os.path.join(run_dir, 'ckpt.keras'))
    with open(os.path.join(run_dir, 'state.json')) as f:
        state = json.load(f)
    os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
    net = task.exported_network(model)
    averaged = None
    if average and average > 1:
        chosen = [(k, p) for k, p in snapshots(run_dir) if k <= state['step']]
        current = None
        if not chosen or chosen[-1][0] != state['step']:
            # the last checkpoint (a stopped run's) is the newest member
            current = prefix + '.tmp.weights.h5'
            net.save_weights(current)
            chosen.append((state['step'], current))
        chosen = chosen[-int(average):]
        if len(chosen) < 2:
            raise ValueError('%s has no weight snapshots before its last checkpoint: nothing '
                             'to average (train with --snapshot-every)' % run_dir)
        try:
            average_snapshots(net, [p for _, p in chosen])
        finally:
            if current:
                os.remove(current)
        averaged = [k for k, _ in chosen]
    net.save_weights(prefix + '.weights.h5')
    vals = [r for r in read_log(run_dir) if r['val_dice']]
    norm = compare_norm_statistics(task, model) if label_dir and task.choose_norm_statistics \
        else None
    card = {
        'model': os.path.basename(prefix),
        'architecture': task.architecture(),
        'input': {'voxsize_mm': cfg['generator'].get('voxsize_mm', 1.0), 'orientation': 'LIA',
                  'intensity': 'robust min-max to [0, 1]', 'train_shape': cfg['shape'],
                  'norm_statistics': max(norm, key=norm.get) if norm else 'moving'},
        'task': config.task,
        'output_labels': task.output_labels(),
        'target': cfg.get('task_options') or None,
        'training': {'steps': state['step'], 'hours': round(state['seconds'] / 3600, 2),
                     'batch_size': cfg['batch_size'], 'learning_rate': cfg['learning_rate'],
                     'loss': task.loss_description(),
                     'label_maps': cfg['label_maps'], 'held_out_maps': cfg['val_maps'],
                     'generator': cfg['generator'],
                     'device': describe_devices(state['devices']) if state.get('devices')
                     else device_description(),
                     'devices': state.get('devices'),
                     'validation_dice_synthetic': _learning_curve(
                         state, vals, prefix + '.json'),
                     'validation_by_norm_statistics': norm,
                     'averaged_snapshots': averaged,
                     'finished': state.get('saved')},
        'scores': scores or {},
        'notes': notes if notes is not None else _old_notes(prefix + '.json'),
    }
    _atomic_json(card, prefix + '.json')
    return card
