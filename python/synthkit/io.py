"""Reading and writing volumes, and batch inputs (a file, a folder or a ``.txt`` list).

Every array that leaves this module travels with its 4x4 voxel-to-world affine (RAS+ mm,
nibabel's convention); grids, conforming and resampling are :mod:`synthkit.geometry`'s.

Formats: NIfTI-1 (``.nii``, ``.nii.gz``) and FreeSurfer MGH (``.mgz``, ``.mgh``), all through
nibabel. A label lookup table can be embedded in MGH outputs, in FreeSurfer's binary colour
table format (what freeview and surfa read).
"""

import gzip
import os
import re
import secrets
import struct
import time
import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.freesurfer.mghformat import MGHHeader

SUPPORTED = ('.nii', '.nii.gz', '.mgz', '.mgh')

#: Real paths of every file read by :func:`load_volume`; :func:`save_volume` refuses to write
#: over them.
_INPUTS = set()


class VolumeError(ValueError):
    """One-line, user-facing problem with a file: ``str(e) == "<path>: <problem>"``."""

    def __init__(self, path, problem):
        self.path = os.fspath(path) if path is not None else '<array>'
        self.problem = problem
        super().__init__('%s: %s' % (self.path, problem))


# ---------------------------------------------------------------------------------------------
# volumes

@dataclass
class Volume:
    """An image and its geometry.

    ``data`` is (X, Y, Z) or (X, Y, Z, F) with frames last, in the dtype stored in the file;
    ``affine`` maps voxel indices to world (RAS+) millimetres; ``header`` is the original
    nibabel header, kept so outputs can copy descriptive fields from it.
    """
    data: np.ndarray
    affine: np.ndarray
    path: str | None = None
    header: object = None

    @property
    def shape3(self):
        """Spatial shape (first three dimensions)."""
        return tuple(self.data.shape[:3])

    @property
    def nframes(self):
        """Number of frames (1 for a 3-D volume)."""
        return self.data.shape[3] if self.data.ndim == 4 else 1

    @property
    def voxsize(self):
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)

    def frame(self, i):
        """The 3-D volume of frame ``i`` (same affine, path and header)."""
        if self.data.ndim == 3:
            if i not in (0, -1):
                raise IndexError('frame %d of a 3-D volume' % i)
            return Volume(self.data, self.affine, self.path, self.header)
        return Volume(self.data[..., i], self.affine, self.path, self.header)


def split_ext(path):
    """``(root, ext)`` with ``ext`` one of :data:`SUPPORTED` (case-insensitive), else ``''``."""
    path = os.fspath(path)
    low = path.lower()
    for ext in sorted(SUPPORTED, key=len, reverse=True):
        if low.endswith(ext):
            return path[:len(path) - len(ext)], path[len(path) - len(ext):]
    return path, ''


def stem(path):
    """Base name without the image extension: ``/a/sub-1_T1w.nii.gz`` -> ``sub-1_T1w``."""
    return split_ext(os.path.basename(os.fspath(path)))[0]


def load_volume(path, allow_empty=False, vector=False):
    """Read a 3-D or 4-D image, checking that it is usable.

    Trailing singleton dimensions beyond the third are dropped, so (X, Y, Z, 1) is 3-D. With
    ``vector``, the NIfTI layout of vector images (ITK's displacement fields: 5-D, X x Y x Z x
    1 x C, the 4th dimension being time) is read as 4-D (X, Y, Z, C); ``Volume.header`` tells
    which layout the file had (``header['dim'][0] == 5``). The data
    keep their stored dtype, in native byte order (scaled NIfTI data come back as floats, as
    nibabel applies the scale). The file is remembered so that :func:`save_volume` never writes
    over it.

    Raises :class:`VolumeError` when the file is missing, has an unsupported extension, is not a
    readable image, has truncated or corrupt data, is not 3-D or 4-D, contains NaN or Inf, is
    all zeros (unless ``allow_empty``), or has a singular or non-finite affine.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(path, 'file not found')
    if os.path.isdir(path):
        raise VolumeError(path, 'is a directory, expected an image file')
    if not split_ext(path)[1]:
        raise VolumeError(path, 'unsupported file type (expected %s)' % ', '.join(SUPPORTED))
    try:
        with _quiet_nibabel():
            img = nib.load(path, mmap=False)
    except Exception as e:  # nibabel raises many types for junk files
        raise VolumeError(path, 'not a readable image (%s)' % _oneline(e)) from None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError for truncated files
        raise VolumeError(path, 'truncated or corrupt image data (%s)' % _oneline(e)) from None
    if data.dtype.kind == 'c':
        raise VolumeError(path, 'complex-valued image (%s); expected real intensities or labels '
                          '(save the magnitude)' % data.dtype)
    if data.dtype.kind not in 'biuf':
        raise VolumeError(path, 'unsupported voxel type %s, expected numbers' % data.dtype)
    if not data.dtype.isnative:  # MGH is big-endian: same type, native byte order
        data = data.astype(data.dtype.newbyteorder('='))

    if vector and data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise VolumeError(path, 'image is %d-D %s, expected a 3-D volume' % (data.ndim, data.shape))
    if data.ndim > 4:
        raise VolumeError(path, 'image is %d-D %s, expected 3-D or 4-D' % (data.ndim, data.shape))
    if data.dtype.kind == 'f':
        if np.isnan(data).any():
            raise VolumeError(path, 'image contains NaN values')
        if np.isinf(data).any():
            raise VolumeError(path, 'image contains Inf values')
        if data.dtype.itemsize > 4 and data.size and \
                np.abs(data).max() > np.finfo(np.float32).max:
            raise VolumeError(path, 'values up to %g exceed the float32 range the tools compute '
                              'in' % np.abs(data).max())
    if not allow_empty and not data.any():
        raise VolumeError(path, 'image is empty (all zeros)')

    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header
    if isinstance(header, nib.Nifti1Header) and not (header['qform_code'] or header['sform_code']):
        pixdim = _raw_pixdim(path, header)
        if not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
            raise VolumeError(path, 'header has no qform or sform and voxel sizes %s: the '
                              'geometry is undefined' % ' x '.join('%g' % v for v in pixdim))
        warnings.warn('%s: NIfTI header has neither qform nor sform; using nibabel\'s default '
                      'affine (voxel sizes only, orientation unknown)' % path, stacklevel=2)
    check_affine(affine, path)
    _INPUTS.add(os.path.realpath(path))
    return Volume(data, affine, path, header)


def _raw_pixdim(path, header):
    """Voxel sizes as stored in a NIfTI header (nibabel silently turns zeros into ones)."""
    from nibabel.openers import ImageOpener
    try:
        with ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
        return np.asarray(raw['pixdim'][1:4], np.float64)
    except Exception:       # unreadable raw header: keep what nibabel made of it
        return np.asarray(header['pixdim'][1:4], np.float64)


class _quiet_nibabel:
    """nibabel's own notices while reading a header (e.g. 'pixdim[0] (qfac) should be 1') are
    kept from stderr: what matters of them is checked and reported here, one line per file."""

    def __enter__(self):
        import logging
        self.logger = logging.getLogger('nibabel.global')
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _oneline(e):
    msg = ' '.join(str(e).split()) or type(e).__name__
    return msg if len(msg) < 160 else msg[:157] + '...'


def check_affine(affine, path):
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(path, 'affine must be 4x4, got shape %s' % (affine.shape,))
    if not np.isfinite(affine).all():
        raise VolumeError(path, 'vox2world affine contains NaN or Inf')
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise VolumeError(path, 'vox2world affine is singular (zero voxel size or degenerate axes)')
    return affine


# ---------------------------------------------------------------------------------------------
# writing

def check_writable(path, exts=SUPPORTED, create=True):
    """Fail early (before any heavy work) if ``path`` cannot be written as an output.

    Creates missing parent directories, as FreeSurfer tools do (with ``create=False``, e.g. a
    dry run, nothing is created: the nearest existing folder above must be writable). Raises
    :class:`VolumeError` when the extension is not one of ``exts``, ``path`` is an existing
    directory or a loaded input, the parent cannot be created, or a file cannot actually be
    created in it.
    """
    path = os.fspath(path)
    if not any(path.lower().endswith(e) for e in exts):
        raise VolumeError(path, 'unsupported output file type (expected %s)' % ', '.join(exts))
    if os.path.isdir(path):
        raise VolumeError(path, 'is an existing directory, expected a file name')
    if os.path.realpath(path) in _INPUTS:
        raise VolumeError(path, 'refusing to overwrite an input file')
    parent = os.path.dirname(os.path.abspath(path))
    if not create and not os.path.isdir(parent):
        above = parent
        while not os.path.isdir(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.exists(parent) or not os.access(above, os.W_OK | os.X_OK):
            raise VolumeError(path, 'cannot create output directory (%s is not a writable '
                              'folder)' % above)
        return
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise VolumeError(path, 'cannot create output directory (%s)' % _oneline(e)) from None
    try:
        tmp = _reserve_temp(path)
    except OSError as e:
        raise VolumeError(path, 'output directory is not writable (%s)' % _oneline(e)) from None
    os.remove(tmp)


def _reserve_temp(path):
    """Create an empty, exclusive temp file next to ``path`` with the same extension, named
    ``.NAME.tmpPID-RANDOM.EXT``; first removes the temps of ``path`` left by a run that was
    killed (its process is gone), so that no stale hidden file outlives the next run."""
    parent, base = os.path.split(os.path.abspath(path))
    ext = split_ext(base)[1] or os.path.splitext(base)[1]
    _remove_stale_temps(parent, base)
    for _ in range(100):
        tmp = os.path.join(parent, '.%s.tmp%d-%s%s' % (base, os.getpid(), secrets.token_hex(4),
                                                       ext))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError('could not create a temp file in %s' % parent)


def _remove_stale_temps(parent, base):
    prefix = '.%s.tmp' % base
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        m = re.match(r'(\d+)-[0-9a-f]+', name[len(prefix):])
        if m:
            try:
                os.kill(int(m.group(1)), 0)
                continue                  # its writer is still running
            except ProcessLookupError:
                pass
            except OSError:               # someone else's live process
                continue
        else:                             # an older naming scheme: stale after an hour
            try:
                if time.time() - os.path.getmtime(os.path.join(parent, name)) < 3600:
                    continue
            except OSError:
                continue
        try:
            os.remove(os.path.join(parent, name))
        except OSError:
            pass


def save_text(text, path):
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    save_bytes(text.encode('utf-8'), path)


def _write_atomically(path, write):
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place; the temp
    file is removed if anything fails, so readers never see a partial file."""
    tmp = _reserve_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_bytes(data, path):
    """Write ``data`` (bytes) to ``path`` atomically."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    _write_atomically(path, write)


def save_csv(path, header, rows):
    """Write a CSV table (a header row, then ``rows``) atomically."""
    import csv
    import io as _io
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    save_text(buf.getvalue(), path)


def save_volume(data, affine, path, like=None, lut=None, dtype=None):
    """Write ``data`` (3-D or 4-D, frames last) with vox2world ``affine`` to ``path``, atomically.

    The format follows the extension (:data:`SUPPORTED`). Data are stored as ``dtype`` if given,
    else in their own dtype, except that bools become uint8 and 64-bit integers int32 (float
    data cast to an integer dtype are rounded). MGH only holds uint8, int16, int32 and float32,
    so other dtypes are widened or narrowed to the closest of these. Integer narrowing checks the
    value range.

    NIfTI outputs get qform and sform set to ``affine`` (code 1, scanner); when ``like`` is a
    :class:`Volume` read from NIfTI, its units and description are copied. MGH outputs copy TR,
    flip angle, TE and TI from an MGH ``like``.

    ``lut`` (a ``surfa.LabelLookup``, e.g. from :func:`synthkit.labels.surfa_lookup`, or a dict
    ``{label: (name, (r, g, b))}``) is embedded in MGH outputs as a FreeSurfer colour table;
    NIfTI has no place for one, so it is ignored there.

    The file is written to a hidden temp file in the target directory and renamed into place,
    so readers never see a partial file. Raises :class:`VolumeError` for an unsupported
    extension or when ``path`` is a file read by :func:`load_volume`.
    """
    path, ext, affine = _output(path, affine)
    arr = _cast(np.asanyarray(data), dtype, mgh=ext in ('.mgz', '.mgh'), path=path)
    if arr.ndim not in (3, 4):
        raise VolumeError(path, 'can only save 3-D or 4-D data, got shape %s' % (arr.shape,))

    header = getattr(like, 'header', None)
    if ext in ('.nii', '.nii.gz'):
        img = _nifti_image(arr, affine, header)
    else:
        img = _mgh_image(arr, affine, header)

    if ext in ('.nii', '.nii.gz'):
        _write_atomically(path, lambda tmp: nib.save(img, tmp))
        return
    raw = img.to_bytes()
    if lut is not None:
        raw += _ctab_tag(lut)
    save_bytes(gzip.compress(raw, compresslevel=6) if ext == '.mgz' else raw, path)


def _output(path, affine):
    """``(path, extension, affine)`` of an output file, checked: a known extension, not an
    input of this process, a usable affine."""
    path = os.fspath(path)
    ext = split_ext(path)[1].lower()
    if not ext:
        raise VolumeError(path, 'unsupported output file type (expected %s)' % ', '.join(SUPPORTED))
    if os.path.realpath(path) in _INPUTS:
        raise VolumeError(path, 'refusing to overwrite an input file')
    return path, ext, check_affine(affine, path)


def save_image(img, path):
    """Write a nibabel image (e.g. a NIfTI whose header was set by hand) atomically."""
    path = os.fspath(path)
    if os.path.realpath(path) in _INPUTS:
        raise VolumeError(path, 'refusing to overwrite an input file')
    _write_atomically(path, lambda tmp: nib.save(img, tmp))


class FrameWriter:
    """A 4-D volume (X, Y, Z, frames) written to ``path`` a region at a time, in memory bounded by
    one region whatever its size (posteriors of a 256^3 scan: 2.2 GB for 33 frames, 6.6 GB for
    99). NIfTI and MGH store each frame whole, x fastest: the uncompressed file is laid out on disk
    beside ``path`` as the regions arrive (each through its own short-lived memory map, so the
    written pages leave this process), then compressed (.nii.gz, .mgz) and renamed into place by
    :meth:`close`, atomically as :func:`save_volume`; nothing is left behind on failure. A context
    manager: leaving it without an exception closes, with one discards.

    ``fill``: ``{frame: value}`` for the voxels that no region writes (0 elsewhere); ``like``,
    ``lut``: as :func:`save_volume`. Stored as float32 (``dtype``: any type both formats hold)."""

    def __init__(self, path, shape, frames, affine, like=None, lut=None, fill=None,
                 dtype=np.float32):
        self.path, self.ext, affine = _output(path, affine)
        self.shape = tuple(int(n) for n in shape[:3]) + (int(frames),)
        self.mgh = self.ext in ('.mgz', '.mgh')
        placeholder = np.broadcast_to(np.zeros((), np.dtype(dtype)), self.shape)
        header = getattr(like, 'header', None)
        self.raw = _reserve_temp(path)
        try:
            with open(self.raw, 'r+b') as f:
                if self.mgh:                       # big-endian
                    self.dtype = np.dtype(dtype).newbyteorder('>')
                    img = _mgh_image(placeholder, affine, header)
                    img.update_header()
                    img.header.writehdr_to(f)
                    self.offset = int(img.header.get_data_offset())
                    f.truncate(self.offset + self._frame_bytes() * self.shape[3])
                    img.header.writeftr_to(f)
                    if lut is not None:
                        f.seek(0, os.SEEK_END)
                        f.write(_ctab_tag(lut))
                else:
                    img = _nifti_image(placeholder, affine, header)
                    img.update_header()
                    hdr = img.header
                    self.dtype = np.dtype(dtype).newbyteorder(hdr.endianness)
                    hdr.set_slope_inter(1.0, 0.0)
                    self.offset = 352              # 348-byte header, 4 bytes: no extension
                    hdr['vox_offset'] = self.offset
                    f.write(hdr.binaryblock + b'\0\0\0\0')
                    f.truncate(self.offset + self._frame_bytes() * self.shape[3])
            for frame, value in (fill or {}).items():
                if value:
                    for z in range(0, self.shape[2], 16):
                        block = self._map(frame, z, min(z + 16, self.shape[2]))
                        block[...] = value
                        del block
        except BaseException:
            self.discard()
            raise

    def _frame_bytes(self):
        return int(np.prod(self.shape[:3])) * self.dtype.itemsize

    def _map(self, frame, z0, z1):
        """Planes ``z0:z1`` of ``frame``, mapped from the file (X, Y, z1 - z0)."""
        x, y = self.shape[:2]
        offset = self.offset + frame * self._frame_bytes() + z0 * x * y * self.dtype.itemsize
        return np.memmap(self.raw, self.dtype, 'r+', offset, (x, y, z1 - z0), order='F')

    def write(self, region, data):
        """Write ``data`` (x, y, z, frames) at ``region`` (three slices of the grid), every frame;
        a region spanning few planes of z (a slab) touches only those planes of each frame."""
        data = np.asarray(data)
        if data.ndim != 4 or data.shape[3] != self.shape[3]:
            raise ValueError('expected (x, y, z, %d) data, got %s' % (self.shape[3], data.shape))
        xs, ys, zs = (slice(*sl.indices(n)[:2]) for sl, n in zip(region, self.shape[:3]))
        for frame in range(self.shape[3]):
            block = self._map(frame, zs.start, zs.stop)
            block[xs, ys] = data[..., frame]
            del block

    def write_frame(self, frame, data):
        """Write one whole frame (X, Y, Z)."""
        if np.shape(data) != self.shape[:3]:
            raise ValueError('expected a %s frame, got %s' % (self.shape[:3], np.shape(data)))
        for z in range(0, self.shape[2], 16):
            block = self._map(frame, z, min(z + 16, self.shape[2]))
            block[...] = data[:, :, z:z + 16]
            del block

    def read_frame(self, frame):
        """One frame (X, Y, Z) as written so far, in memory (native byte order)."""
        block = self._map(frame, 0, self.shape[2])
        out = np.array(block, dtype=self.dtype.newbyteorder('='))
        del block
        return out

    def close(self):
        """Compress if the extension says so and move the file into place."""
        if self.raw is None:
            return
        try:
            if self.ext in ('.nii.gz', '.mgz'):
                def compress(tmp):
                    with open(self.raw, 'rb') as src, \
                            gzip.open(tmp, 'wb', compresslevel=1) as dst:
                        while True:
                            chunk = src.read(1 << 24)
                            if not chunk:
                                break
                            dst.write(chunk)
                _write_atomically(self.path, compress)
                os.remove(self.raw)
            else:
                os.replace(self.raw, self.path)
            self.raw = None
        except BaseException:
            self.discard()
            raise

    def discard(self):
        """Remove the unfinished file."""
        if self.raw is not None and os.path.exists(self.raw):
            os.remove(self.raw)
        self.raw = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.discard()
        return False


def _cast(arr, dtype, mgh, path):
    target = np.dtype(dtype) if dtype is not None else arr.dtype
    if target == np.bool_:
        target = np.dtype(np.uint8)
    elif target in (np.int64, np.uint64):
        target = np.dtype(np.int32)
    if mgh:
        if target.kind == 'f':
            target = np.dtype(np.float32)
        elif target == np.int8:
            target = np.dtype(np.int16)
        elif target.kind in 'iu' and target not in (np.uint8, np.int16, np.int32):
            target = np.dtype(np.int32)
        elif target.kind not in 'iuf':
            raise VolumeError(path, 'MGH cannot store %s data' % target)
    if target.kind in 'iu' and arr.size:
        if arr.dtype.kind == 'f':
            if not np.isfinite(arr).all():
                raise VolumeError(path, 'cannot store NaN or Inf as integers')
            arr = np.rint(arr)
        info = np.iinfo(target)
        if arr.dtype.kind in 'iuf' and (arr.min() < info.min or arr.max() > info.max):
            raise VolumeError(path, 'values [%s, %s] do not fit in %s'
                              % (arr.min(), arr.max(), target))
    return np.asarray(arr).astype(target, copy=False)


def _mgh_image(arr, affine, like_header):
    img = nib.MGHImage(arr, affine)
    if isinstance(like_header, MGHHeader):
        for key in ('tr', 'flip_angle', 'te', 'ti'):
            img.header[key] = like_header[key]
    return img


def _nifti_image(arr, affine, like_header):
    header = nib.Nifti1Header()
    header.set_xyzt_units('mm', 'sec')
    if isinstance(like_header, nib.Nifti1Header):
        header.set_xyzt_units(*like_header.get_xyzt_units())
        header['descrip'] = like_header['descrip']
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if arr.ndim == 4 and isinstance(like_header, nib.Nifti1Header):
        zooms = like_header.get_zooms()
        if len(zooms) > 3:
            img.header.set_zooms(img.header.get_zooms()[:3] + (zooms[3],))
    img.set_data_dtype(arr.dtype)
    return img


# FreeSurfer tags after the MGH footer (utils/tags.h)
_TAG_OLD_COLORTABLE = 1
_LENGTHLESS_TAGS = (1, 2, 10, 11, 12, 20)
_TAG_OLD_XFORM = 30


def _lut_entries(lut):
    """``[(label, name, (r, g, b), transparency)]`` from a surfa LabelLookup or a dict."""
    entries = []
    for label, value in sorted(lut.items()):
        if hasattr(value, 'name'):  # surfa LabelElement: color is RGBA, alpha in [0, 1]
            color = np.asarray(value.color, dtype=np.float64)
            name, rgb = value.name, color[:3]
            alpha = color[3] if color.size > 3 else 1.0
        else:
            name, rgb = value[0], value[1]
            alpha = 1.0
        rgb = tuple(int(round(c)) for c in rgb)
        entries.append((int(label), str(name), rgb, int(round(255 * (1 - alpha)))))
    return entries


def _ctab_tag(lut):
    """The ``TAG_OLD_COLORTABLE`` tag holding ``lut`` in FreeSurfer's binary (version 2) format."""
    entries = _lut_entries(lut)
    out = [struct.pack('>iiiii', _TAG_OLD_COLORTABLE, -2, max(e[0] for e in entries) + 1, 0,
                       len(entries))]
    for label, name, rgb, transparency in entries:
        raw = name.encode('utf-8') + b'\x00'
        out.append(struct.pack('>ii', label, len(raw)) + raw
                   + struct.pack('>iiii', *rgb, transparency))
    return b''.join(out)


def load_lut(path):
    """The colour table embedded in an MGH file as ``{label: (name, (r, g, b))}``, or None."""
    path = os.fspath(path)
    img = nib.load(path)
    if not isinstance(img, nib.MGHImage):
        return None
    offset = img.header.get_footer_offset() + img.header._ftrdtype.itemsize
    opener = gzip.open if path.lower().endswith('.mgz') else open
    with opener(path, 'rb') as f:
        f.seek(offset)
        rest = f.read()

    def ints(pos, n):
        return struct.unpack_from('>%di' % n, rest, pos), pos + 4 * n

    pos = 0
    while pos + 4 <= len(rest):
        (tag,), pos = ints(pos, 1)
        if tag == _TAG_OLD_COLORTABLE:
            (version,), pos = ints(pos, 1)
            if version >= 0:
                return None  # version-1 tables are not written by any current tool
            (_, fname_len), pos = ints(pos, 2)
            pos += fname_len
            (count,), pos = ints(pos, 1)
            lut = {}
            for _ in range(count):
                (label, name_len), pos = ints(pos, 2)
                name = rest[pos:pos + name_len].rstrip(b'\x00').decode('utf-8', 'replace')
                (r, g, b, _), pos = ints(pos + name_len, 4)
                lut[label] = (name, (r, g, b))
            return lut
        if tag == 0 or tag in _LENGTHLESS_TAGS:
            return None  # end, or a tag whose length we cannot know
        if tag == _TAG_OLD_XFORM:
            (length,), pos = ints(pos, 1)
        else:
            (length,) = struct.unpack_from('>q', rest, pos)
            pos += 8
        pos += length
    return None


# ---------------------------------------------------------------------------------------------
# batch inputs

def _is_dir_like(path):
    return os.path.isdir(path) or path.endswith(('/', os.sep))


def list_images(folder, derived=()):
    """Supported images in ``folder`` (not hidden files), sorted by name.

    ``derived``: regular expressions of the suffixes a tool adds to an input's stem (e.g.
    ``'_synthseg'``): an image whose stem is another image's stem plus such a suffix is an
    earlier output of that tool and is left out, so that running a folder into itself does not
    process its own results."""
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith('.') and split_ext(n)[1]
                   and os.path.isfile(os.path.join(folder, n)))
    if derived:
        stems = {split_ext(n)[0] for n in names}
        pattern = re.compile('(.+?)(?:%s)$' % '|'.join(derived))
        names = [n for n in names if not any(
            m.group(1) in stems for m in [pattern.match(split_ext(n)[0])] if m)]
    return [os.path.join(folder, n) for n in names]


def _read_list(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def batch_pairs(inp, out, out_suffix='_synthseg', ext=None, derived=None):
    """``[(input, output)]`` for a file, a folder or a ``.txt`` list, paired as by mri_synthseg.

    - ``inp`` a file: ``out`` is a file path; if ``out`` is an existing folder or ends with
      ``/``, the output is ``<out>/<stem><out_suffix><ext>``.
    - ``inp`` a folder: every supported image in it (sorted); ``out`` must be a folder (created
      if missing); outputs ``<out>/<stem><out_suffix><ext>``.
    - ``inp`` a ``.txt``: one input per non-empty line; ``out`` must be a ``.txt`` with as many.

    ``ext`` defaults to each input's own extension. ``out=None`` gives ``(input, None)`` pairs,
    for optional outputs. ``derived`` (default: ``out_suffix``): see :func:`list_images`.
    Raises ``ValueError`` naming the offending path.
    """
    inp = os.fspath(inp)
    out = None if out is None else os.fspath(out)
    if inp.lower().endswith('.txt'):
        if not os.path.isfile(inp):
            raise ValueError('%s: input list not found' % inp)
        inputs = _read_list(inp)
        if not inputs:
            raise ValueError('%s: input list is empty' % inp)
        if out is None:
            return [(i, None) for i in inputs]
        if not out.lower().endswith('.txt'):
            raise ValueError('%s: output must be a .txt list when the input is a .txt list (%s)'
                             % (out, inp))
        if not os.path.isfile(out):
            raise ValueError('%s: output list not found' % out)
        outputs = _read_list(out)
        if len(outputs) != len(inputs):
            raise ValueError('%s has %d paths but %s has %d; they must match line by line'
                             % (inp, len(inputs), out, len(outputs)))
        return list(zip(inputs, outputs))

    if os.path.isdir(inp):
        inputs = list_images(inp, [re.escape(out_suffix)] if derived is None else derived)
        if not inputs:
            raise ValueError('%s: no images (%s) in folder' % (inp, ', '.join(SUPPORTED)))
        if out is None:
            return [(i, None) for i in inputs]
        if os.path.isfile(out) or (split_ext(out)[1] and not _is_dir_like(out)):
            raise ValueError('%s: output must be a folder when the input is a folder (%s)'
                             % (out, inp))
        os.makedirs(out, exist_ok=True)
        return [(i, _named_output(out, i, out_suffix, ext)) for i in inputs]

    if not os.path.exists(inp):
        raise ValueError('%s: input not found' % inp)
    if not split_ext(inp)[1]:
        raise ValueError('%s: unsupported input type (expected %s, a folder or a .txt list)'
                         % (inp, ', '.join(SUPPORTED)))
    if out is None:
        return [(inp, None)]
    if _is_dir_like(out):
        os.makedirs(out, exist_ok=True)
        return [(inp, _named_output(out, inp, out_suffix, ext))]
    return [(inp, out)]


def _named_output(folder, inp, suffix, ext):
    ext = ext if ext is not None else split_ext(inp)[1]
    return os.path.join(folder, stem(inp) + suffix + ext)


def batch_optional(inp, opt, suffix, ext=None, derived=None):
    """Paths of an optional per-image output (e.g. ``--post``), aligned with
    :func:`batch_pairs` ``(inp, ...)`` (give both the same ``derived``): a list of ``None``
    when ``opt`` is None."""
    return [o for _, o in batch_pairs(inp, opt, suffix, ext, derived)]
