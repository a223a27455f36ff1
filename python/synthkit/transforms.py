"""Spatial transforms between two scans: FreeSurfer LTA matrices and displacement fields.

Direction (FreeSurfer's, as written by ``mri_synthmorph register -t``): a transform goes from a
*moving* (source) image to a *fixed* (target) image.

- A matrix :class:`Transform` holds the 4x4 RAS-to-RAS matrix ``M`` that maps a point's
  moving-world coordinates to its fixed-world coordinates, ``x_fixed = M @ x_moving`` (RAS+ mm,
  homogeneous). This is the matrix of a ``type = 1`` (``LINEAR_RAS_TO_RAS``) LTA whose ``src``
  volume is the moving image and whose ``dst`` volume is the fixed one, so ``mri_vol2vol --mov
  moving --targ fixed --lta t.lta`` and ``mri_synthmorph apply t.lta moving out`` agree.
  Resampling the moving image onto the fixed grid therefore pulls each fixed voxel ``v`` from the
  moving-world point ``inv(M) @ fixed_affine @ v``.
- A warp :class:`Transform` holds a displacement field ``disp`` of shape (X, Y, Z, 3) on the fixed
  grid, in world RAS mm (surfa's ``Warp.Format.disp_ras``, what SynthMorph saves for deformable
  registration): the moving-world point of fixed voxel ``v`` is ``fixed_affine @ v + disp[v]``.

Only the moving image's own affine is used to find a moving-world point in its voxels, so a
transform applies to any image in the moving image's world space (a segmentation at another
resolution, another contrast of the same session), as with FreeSurfer's tools.

LTA files are text, read and written in the layout of FreeSurfer's ``LTAprint`` /
``ltaReadFileEx`` (utils/transform.cpp)::

    type      = 1 # LINEAR_RAS_TO_RAS
    nxforms   = 1
    mean      = 0.0000 0.0000 0.0000
    sigma     = 1.0000
    1 4 4
    <4 rows of 4 numbers>
    src volume info
    valid = 1  # volume info valid
    filename = moving.nii.gz
    volume = 256 256 256
    voxelsize = 1 1 1
    xras   = -1 0 0
    yras   = 0 0 -1
    zras   = 0 1 0
    cras   = 0 0 0
    dst volume info
    <the same 8 lines>
    subject unknown
    fscale 0.100000

A volume info block describes a grid: ``volume`` its shape, ``voxelsize`` the voxel sizes,
``xras``/``yras``/``zras`` the unit world directions of the three voxel axes and ``cras`` the
world position of voxel ``volume / 2`` (not rounded), so ``vox2ras = [R * voxelsize | cras - R *
voxelsize @ volume / 2]`` with ``R = [xras yras zras]`` as columns. A ``type = 0``
(``LINEAR_VOX_TO_VOX``) matrix maps zero-based source voxel indices to destination voxel
indices; it is converted on reading to ``dst_vox2ras @ M @ inv(src_vox2ras)``, as FreeSurfer's
``LTAchangeType`` does.
"""

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import io

#: LTA type codes (FreeSurfer utils/transform.h) this module reads and writes.
LINEAR_VOX_TO_VOX = 0
LINEAR_RAS_TO_RAS = 1
LTA_TYPE_NAMES = {0: 'LINEAR_VOX_TO_VOX', 1: 'LINEAR_RAS_TO_RAS', 2: 'LINEAR_PHYSVOX_TO_PHYSVOX',
                  14: 'REGISTER_DAT', 21: 'LINEAR_COR_TO_COR'}

_GEOM_KEYS = ('valid', 'filename', 'volume', 'voxelsize', 'xras', 'yras', 'zras', 'cras')
_MAX_LTA_BYTES = 1 << 20
_SLAB_VOXELS = 1 << 21  # resampling works on slabs of this many voxels, to bound memory
_EDGE_TOL = 1e-5  # voxels: how far beyond the outermost voxel centres a point still samples


class TransformError(ValueError):
    """One-line, user-facing problem with a transform file: ``str(e) == "<path>: <problem>"``."""

    def __init__(self, path, problem):
        self.path = os.fspath(path) if path is not None else '<transform>'
        self.problem = problem
        super().__init__('%s: %s' % (self.path, problem))


# ---------------------------------------------------------------------------------------------
# geometry and transforms

@dataclass(eq=False)
class Geometry:
    """A voxel grid: spatial ``shape`` (3 ints) and its vox2world ``affine`` (4x4, RAS+ mm).

    ``filename`` is informative only (the ``filename`` line of an LTA volume info block).
    """
    shape: tuple
    affine: np.ndarray
    filename: str = ''

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape[:3])
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError('geometry shape must be 3 positive ints, got %s' % (self.shape,))
        self.affine = np.array(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.isfinite(self.affine).all() \
                or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise ValueError('geometry affine must be a finite, invertible 4x4 matrix')

    @classmethod
    def of(cls, volume):
        """The grid of an :class:`io.Volume` or a ``(data, affine)`` pair."""
        data, affine, path = _unpack(volume)
        return cls(data.shape[:3], affine, path or '')


@dataclass(eq=False)
class Transform:
    """A moving-to-fixed spatial transform: a RAS-to-RAS matrix or a displacement field.

    Exactly one of ``matrix`` and ``disp`` is set (see the module docstring for directions):

    - ``matrix``: 4x4 float64, moving world (RAS mm) -> fixed world. ``source`` is the moving
      grid and ``target`` the fixed grid that the moving image is resampled onto; either may be
      None when unknown (an LTA volume info block with ``valid = 0``).
    - ``disp``: float32 (X, Y, Z, 3), world RAS mm, on the fixed grid ``target`` (required, of
      shape (X, Y, Z)); ``fixed_affine @ v + disp[v]`` is the moving-world point of voxel ``v``.
      ``source`` (moving grid) is optional.

    ``subject`` and ``fscale`` are kept for the LTA's trailing tkregister lines; ``path`` is the
    file the transform was read from, if any.
    """
    matrix: np.ndarray = None
    source: Geometry = None
    target: Geometry = None
    disp: np.ndarray = None
    subject: str = ''
    fscale: float = 0.1
    path: str = None

    def __post_init__(self):
        if (self.matrix is None) == (self.disp is None):
            raise ValueError('a Transform holds exactly one of matrix and disp')
        if self.matrix is not None:
            self.matrix = _check_matrix(self.matrix, self.path)
        else:
            self.disp = np.asarray(self.disp, dtype=np.float32)
            if self.disp.ndim != 4 or self.disp.shape[3] != 3:
                raise ValueError('displacement field must be (X, Y, Z, 3), got shape %s'
                                 % (self.disp.shape,))
            if self.target is None or self.target.shape != self.disp.shape[:3]:
                raise ValueError('a displacement field needs its fixed grid (target) of shape %s'
                                 % (self.disp.shape[:3],))

    @property
    def is_warp(self):
        """True for a displacement field, False for a matrix."""
        return self.disp is not None

    def inverse(self):
        """The fixed-to-moving matrix transform (geometries swapped). Matrices only."""
        if self.is_warp:
            raise ValueError('cannot invert a displacement field exactly')
        return Transform(np.linalg.inv(self.matrix), self.target, self.source,
                         subject=self.subject, fscale=self.fscale)

    def vox2vox(self):
        """The matrix as a map from moving (source) to fixed (target) zero-based voxel indices,
        ``inv(target.affine) @ matrix @ source.affine`` (an LTA ``type = 0`` matrix)."""
        if self.is_warp or self.source is None or self.target is None:
            raise ValueError('vox2vox needs a matrix transform with source and target geometry')
        return np.linalg.inv(self.target.affine) @ self.matrix @ self.source.affine

    def as_warp(self, target=None):
        """The equivalent displacement field on ``target`` (default: this matrix's target)."""
        if self.is_warp:
            return self
        target = target or self.target
        if target is None:
            raise ValueError('as_warp needs a target geometry')
        shape, affine = target.shape, target.affine
        # world -> displacement is linear: d(x) = (inv(M) - I) x, with x = A v
        lin = (np.linalg.inv(self.matrix) - np.eye(4)) @ affine
        grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
        disp = (lin[:3, :3] @ grid + lin[:3, 3:]).T.reshape(shape + (3,))
        return Transform(disp=disp, source=self.source, target=target)


def _check_matrix(matrix, path=None):
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise TransformError(path, 'matrix is not numeric') from None
    if m.shape == (3, 4):
        m = np.vstack([m, [0, 0, 0, 1]])
    if m.shape != (4, 4):
        raise TransformError(path, 'matrix must be 4x4, got shape %s' % (m.shape,))
    if not np.isfinite(m).all():
        raise TransformError(path, 'matrix contains NaN or Inf')
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise TransformError(path, 'matrix is not affine (last row %s, expected 0 0 0 1)'
                             % ' '.join('%g' % v for v in m[3]))
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise TransformError(path, 'matrix is singular')
    return m


def _unpack(volume):
    """``(data, affine, path)`` of an :class:`io.Volume` or a ``(data, affine)`` pair."""
    if isinstance(volume, io.Volume):
        return np.asanyarray(volume.data), np.asarray(volume.affine, np.float64), volume.path
    data, affine = volume
    return np.asanyarray(data), np.asarray(affine, np.float64), None


# ---------------------------------------------------------------------------------------------
# LTA files

def _geometry_to_lines(geom):
    """The 8 lines of an LTA volume info block (FreeSurfer's ``writeVolGeom``)."""
    if geom is None:  # FreeSurfer's initVolGeom: 256^3 coronal, flagged invalid
        shape, vox = (256, 256, 256), np.ones(3)
        rot, cras, name, valid = np.array([[-1., 0, 0], [0, 0, 1], [0, -1, 0]]), np.zeros(3), '', 0
    else:
        lin = geom.affine[:3, :3]
        vox = np.linalg.norm(lin, axis=0)
        rot = lin / vox  # columns: unit world directions of the voxel axes (exact even if sheared)
        cras = geom.affine[:3, :3] @ (np.asarray(geom.shape, float) / 2) + geom.affine[:3, 3]
        shape, name, valid = geom.shape, ' '.join(str(geom.filename).split()), 1

    def vec(v):
        return '%.15e %.15e %.15e' % tuple(v)

    return ['valid = %d  # volume info %svalid' % (valid, '' if valid else 'in'),
            'filename = %s' % name,
            'volume = %d %d %d' % tuple(shape),
            'voxelsize = %s' % vec(vox),
            'xras   = %s' % vec(rot[:, 0]),
            'yras   = %s' % vec(rot[:, 1]),
            'zras   = %s' % vec(rot[:, 2]),
            'cras   = %s' % vec(cras)]


def _geometry_from_fields(fields, path, which):
    """A :class:`Geometry` from a parsed volume info block, None if flagged invalid."""
    def numbers(key, kind=float):
        try:
            vals = [kind(v) for v in fields[key].split()]
        except ValueError:
            vals = []
        if len(vals) != 3:
            raise TransformError(path, '%s volume info: %r needs 3 numbers, got %r'
                                 % (which, key, fields[key]))
        return np.array(vals)

    try:
        valid = int(fields['valid'].split()[0])
    except (ValueError, IndexError):
        raise TransformError(path, '%s volume info: bad valid flag %r'
                             % (which, fields['valid'])) from None
    if not valid:
        return None
    shape = numbers('volume', int)
    vox = numbers('voxelsize')
    rot = np.stack([numbers('xras'), numbers('yras'), numbers('zras')], axis=1)
    cras = numbers('cras')
    if (shape < 1).any() or not (vox > 0).all() or not np.isfinite(rot).all() \
            or abs(np.linalg.det(rot)) < 1e-6 or not np.isfinite(cras).all():
        raise TransformError(path, '%s volume info describes no valid grid' % which)
    affine = np.eye(4)
    affine[:3, :3] = rot * vox
    affine[:3, 3] = cras - affine[:3, :3] @ (shape / 2)
    return Geometry(tuple(shape), affine, fields['filename'].strip())


def read_lta(path):
    """Read a FreeSurfer LTA file (``type`` 0 or 1, one transform) as a matrix :class:`Transform`.

    ``LINEAR_RAS_TO_RAS`` matrices are taken as they are; ``LINEAR_VOX_TO_VOX`` ones are
    converted to RAS-to-RAS with the file's src and dst volume info, which must then be valid.
    Volume info blocks flagged ``valid = 0`` (or absent, in old files) give ``None``
    geometries. Comment lines (``#``), blank lines and trailing ``# ...`` comments are ignored,
    as are the optional ``subject`` / ``fscale`` lines beyond keeping their values.

    Raises :class:`TransformError` (a ``ValueError``, ``"<path>: <problem>"``) for a missing or
    unreadable file, another LTA type, several transforms, a malformed or singular matrix, or a
    malformed volume info block.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TransformError(path, 'is a directory' if os.path.isdir(path) else 'file not found')
    try:
        if os.path.getsize(path) > _MAX_LTA_BYTES:
            raise TransformError(path, 'not an LTA file (larger than %d bytes)' % _MAX_LTA_BYTES)
        with open(path, 'rb') as f:
            raw = f.read()
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        raise TransformError(path, 'not an LTA file (binary data, expected text)') from None
    except OSError as e:
        raise TransformError(path, 'cannot read (%s)' % (e.strerror or e)) from None

    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if not line.startswith('filename'):
            line = line.split('#', 1)[0].strip()
        lines.append(line)
    if not lines:
        raise TransformError(path, 'not an LTA file (empty)')
    pos = 0

    def keyed(key):
        """Value of the next line, which must read ``key = value``."""
        nonlocal pos
        if pos >= len(lines):
            raise TransformError(path, 'not an LTA file (ends before %r)' % key)
        name, eq, value = lines[pos].partition('=')
        if name.strip() != key or not eq:
            raise TransformError(path, 'not an LTA file (expected %r, got %r)' % (key, lines[pos]))
        pos += 1
        return value.strip()

    def integer(key):
        value = keyed(key)
        try:
            return int(value.split()[0])
        except (ValueError, IndexError):
            raise TransformError(path, 'not an LTA file (bad %s %r)' % (key, value)) from None

    lta_type = integer('type')
    if lta_type not in (LINEAR_VOX_TO_VOX, LINEAR_RAS_TO_RAS):
        raise TransformError(path, 'unsupported LTA type %d (%s); expected 0 (LINEAR_VOX_TO_VOX)'
                             ' or 1 (LINEAR_RAS_TO_RAS)'
                             % (lta_type, LTA_TYPE_NAMES.get(lta_type, 'unknown')))
    nxforms = integer('nxforms')
    if nxforms != 1:
        raise TransformError(path, 'holds %d transforms, only 1 is supported' % nxforms)
    keyed('mean')
    keyed('sigma')
    if pos >= len(lines) or lines[pos].split() != ['1', '4', '4']:
        raise TransformError(path, "not an LTA file (expected the matrix size '1 4 4')")
    try:
        rows = [[float(v) for v in lines[pos + 1 + r].split()] for r in range(4)]
    except (IndexError, ValueError):
        rows = None
    if rows is None or any(len(r) != 4 for r in rows):
        raise TransformError(path, 'not an LTA file (the matrix needs 4 rows of 4 numbers)')
    pos += 5
    matrix = _check_matrix(rows, path)
    if pos < len(lines) and lines[pos].startswith('label'):
        pos += 1  # old files: 'label = <int>' after the matrix (FreeSurfer's ltaReadFile)

    geoms = {}
    for which in ('src', 'dst'):
        if pos >= len(lines):
            geoms[which] = None  # old files carry no volume info
            continue
        if lines[pos] != '%s volume info' % which:
            raise TransformError(path, "expected '%s volume info', got %r" % (which, lines[pos]))
        block = lines[pos + 1:pos + 1 + len(_GEOM_KEYS)]
        fields = {}
        for line in block:
            name, _, value = line.partition('=')
            fields[name.strip()] = value.strip()
        missing = [k for k in _GEOM_KEYS if k not in fields]
        if missing:
            raise TransformError(path, '%s volume info lacks %s' % (which, ', '.join(missing)))
        geoms[which] = _geometry_from_fields(fields, path, which)
        pos += 1 + len(_GEOM_KEYS)

    subject, fscale = '', 0.1
    for line in lines[pos:]:
        words = line.split()
        if words[0] == 'subject':
            subject = words[1] if len(words) > 1 else ''
        elif words[0] == 'fscale' and len(words) > 1:
            try:
                fscale = float(words[1])
            except ValueError:
                pass

    src, dst = geoms['src'], geoms['dst']
    if lta_type == LINEAR_VOX_TO_VOX:
        if src is None or dst is None:
            raise TransformError(path, 'a LINEAR_VOX_TO_VOX transform needs valid src and dst '
                                 'volume info')
        matrix = dst.affine @ matrix @ np.linalg.inv(src.affine)
    io._INPUTS.add(os.path.realpath(path))  # never written over by this session's outputs
    return Transform(matrix, src, dst, subject=subject, fscale=fscale, path=path)


def lta_text(transform, lta_type=LINEAR_RAS_TO_RAS, comment=None):
    """The LTA file content for a matrix ``transform``, in FreeSurfer's ``LTAprint`` layout.

    ``lta_type`` 1 writes the RAS-to-RAS matrix, 0 the voxel-to-voxel one (which needs both
    geometries). Unknown geometries are written as FreeSurfer's default block with
    ``valid = 0``. ``comment`` lines are written first, prefixed with ``#``.
    """
    if transform.is_warp:
        raise ValueError('an LTA holds a matrix, not a displacement field')
    if lta_type == LINEAR_RAS_TO_RAS:
        matrix = transform.matrix
    elif lta_type == LINEAR_VOX_TO_VOX:
        matrix = transform.vox2vox()
    else:
        raise ValueError('lta_type must be 0 (LINEAR_VOX_TO_VOX) or 1 (LINEAR_RAS_TO_RAS), '
                         'got %r' % (lta_type,))
    out = ['# %s' % c for c in (comment.splitlines() if comment else [])]
    if out:
        out.append('')
    out += ['type      = %d # %s' % (lta_type, LTA_TYPE_NAMES[lta_type]),
            'nxforms   = 1',
            'mean      = 0.0000 0.0000 0.0000',
            'sigma     = 1.0000',
            '1 4 4']
    out += [''.join('%18.15e ' % v for v in row) for row in matrix]
    out += ['src volume info'] + _geometry_to_lines(transform.source)
    out += ['dst volume info'] + _geometry_to_lines(transform.target)
    out += ['subject %s' % (''.join(str(transform.subject).split()) or 'unknown'),
            'fscale %f' % (transform.fscale if transform.fscale > 0 else 0.1)]
    return '\n'.join(out) + '\n'


def write_lta(transform, path, lta_type=LINEAR_RAS_TO_RAS):
    """Write a matrix ``transform`` to ``path`` as a FreeSurfer LTA file, atomically.

    See :func:`lta_text` for the content. The file is written to a hidden temp file beside
    ``path`` and renamed into place. Raises :class:`TransformError` when ``path`` is a file
    this session read as an input or cannot be written.
    """
    path = os.fspath(path)
    if os.path.realpath(path) in io._INPUTS:
        raise TransformError(path, 'refusing to overwrite an input file')
    if os.path.isdir(path):
        raise TransformError(path, 'is an existing directory, expected a file name')
    text = lta_text(transform, lta_type, comment='transform file %s\ncreated by synthkit'
                    % os.path.basename(path))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        io.save_text(text, path)
    except OSError as e:
        raise TransformError(path, 'cannot write (%s)' % (e.strerror or e)) from None


# ---------------------------------------------------------------------------------------------
# displacement fields

def read_warp(path):
    """Read a displacement field image, world mm on the fixed grid, into a :class:`Transform`.

    Two layouts are read (any image format of :func:`io.load_volume` for the first):

    - ours and FreeSurfer's (``mri_synthmorph``): (X, Y, Z, 3), displacements in RAS mm;
    - ITK's / ANTs' (``antsRegistration``'s ``*Warp.nii.gz``, Slicer, :func:`write_itk_warp`):
      NIfTI (X, Y, Z, 1, 3), intent vector, displacements in LPS mm (converted to RAS).

    Both pull: the moving-world point of fixed voxel ``v`` is ``affine @ v + disp[v]``.
    Raises :class:`io.VolumeError` for an unreadable image and :class:`TransformError` for
    one that is not a 3-component field.
    """
    vol = io.load_volume(path, allow_empty=True, vector=True)  # identity: all zeros
    if vol.data.ndim != 4 or vol.data.shape[3] != 3:
        raise TransformError(path, 'not a displacement field: expected shape (X, Y, Z, 3) or '
                             'ITK\'s (X, Y, Z, 1, 3), got %s' % (vol.data.shape,))
    disp = vol.data
    if is_itk_layout(vol.header):
        disp = np.asarray(disp, np.float32) * _LPS
    return Transform(disp=disp, target=Geometry(vol.shape3, vol.affine, vol.path),
                     path=vol.path)


#: RAS <-> LPS for displacement vectors (ITK works in LPS physical space).
_LPS = np.array([-1.0, -1.0, 1.0], np.float32)
NIFTI_INTENT_VECTOR = 1007


def is_itk_layout(header):
    """True for a NIfTI header of ITK's vector layout: 5 dimensions, the 4th (time) of 1."""
    try:
        dim = header['dim']
        return int(dim[0]) == 5 and int(dim[4]) == 1
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def write_warp(transform, path, itk=False):
    """Save a transform as a float32 displacement image on its target grid, atomically. A
    matrix is written as its equivalent field.

    ``itk=False``: (X, Y, Z, 3), RAS mm (FreeSurfer's ``mri_synthmorph`` layout), any format of
    :data:`io.SUPPORTED`. ``itk=True``: ITK's displacement field, as ``antsApplyTransforms -t``,
    ITK-SNAP and 3D Slicer read it: NIfTI (.nii/.nii.gz) of shape (X, Y, Z, 1, 3), intent code
    1007 (vector), displacements in LPS mm, qform and sform the fixed grid's affine."""
    if itk:
        write_itk_warp(transform, path)
        return
    warp = transform.as_warp()
    io.save_volume(warp.disp, warp.target.affine, path, dtype=np.float32)


def write_itk_warp(transform, path):
    """The ITK/ANTs displacement field of ``transform`` (see :func:`write_warp`)."""
    import nibabel as nib
    path = os.fspath(path)
    if io.split_ext(path)[1].lower() not in ('.nii', '.nii.gz'):
        raise TransformError(path, 'an ITK displacement field is a NIfTI file (.nii, .nii.gz)')
    warp = transform.as_warp()
    affine = io.check_affine(warp.target.affine, path)
    data = (warp.disp.astype(np.float32) * _LPS)[:, :, :, None, :]
    header = nib.Nifti1Header()
    header.set_xyzt_units('mm', 'sec')
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_intent(NIFTI_INTENT_VECTOR, (), name='')
    img.set_data_dtype(np.float32)
    io.save_image(img, path)


# ---------------------------------------------------------------------------------------------
# ITK / ANTs matrices

#: Extensions of ITK affine transform files: text (``#Insight Transform File V1.0``) and the
#: MATLAB v4 files of antsRegistration (``0GenericAffine.mat``).
ITK_MATRIX_EXTS = ('.txt', '.tfm', '.mat')
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])          # RAS <-> LPS, points


def _itk_matrix(transform):
    """ITK's 4x4 (LPS, fixed point -> moving point) of a moving-to-fixed RAS matrix."""
    return _FLIP @ np.linalg.inv(transform.matrix) @ _FLIP


def _from_itk(lps, path):
    return Transform(_FLIP @ np.linalg.inv(lps) @ _FLIP, path=path)


def write_itk_affine(transform, path):
    """Save a matrix transform as an ITK ``AffineTransform_double_3_3``, atomically: text for
    ``.txt``/``.tfm``, MATLAB v4 for ``.mat`` (as antsRegistration writes). ITK maps points of
    the fixed space to the moving space, in LPS mm, so this is the inverse of our RAS matrix,
    with both sides flipped; the centre (``FixedParameters``) is 0. ``antsApplyTransforms -t``,
    Slicer and ITK-SNAP read it; no grid is stored."""
    path = os.fspath(path)
    if transform.is_warp:
        raise TransformError(path, 'an ITK affine file holds a matrix, not a displacement field')
    m = _itk_matrix(transform)
    params = list(m[:3, :3].ravel()) + list(m[:3, 3])
    if path.lower().endswith('.mat'):
        import io as _io
        from scipy.io import savemat
        buf = _io.BytesIO()
        savemat(buf, {'AffineTransform_double_3_3': np.array(params, np.float64)[:, None],
                      'fixed': np.zeros((3, 1))}, format='4')
        io.save_bytes(buf.getvalue(), path)
        return
    io.save_text('#Insight Transform File V1.0\n#Transform 0\n'
                 'Transform: AffineTransform_double_3_3\n'
                 'Parameters: %s\nFixedParameters: 0 0 0\n'
                 % ' '.join(repr(float(v)) for v in params), path)


def read_itk_affine(path):
    """Read an ITK affine/rigid transform file (text or antsRegistration's .mat) as a matrix
    :class:`Transform` (moving-to-fixed RAS, no grids). Raises :class:`TransformError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TransformError(path, 'file not found')
    try:
        if path.lower().endswith('.mat'):
            from scipy.io import loadmat
            mat = loadmat(path)
            key = next((k for k in mat if not k.startswith('__') and k != 'fixed'), None)
            if key is None:
                raise ValueError('no transform in the file')
            params, fixed = np.ravel(mat[key]), np.ravel(mat.get('fixed', np.zeros(3)))
        else:
            fields = {}
            with open(path) as f:
                for line in f:
                    if ':' in line and not line.startswith('#'):
                        k, v = line.split(':', 1)
                        fields.setdefault(k.strip(), v.split())
            kind = fields.get('Transform', ['?'])[0]
            if not kind.startswith(('AffineTransform', 'MatrixOffsetTransformBase')):
                raise ValueError('unsupported ITK transform %s (affine transforms only)' % kind)
            params = np.array(fields['Parameters'], np.float64)
            fixed = np.array(fields.get('FixedParameters', [0, 0, 0]), np.float64)
        if params.size != 12 or fixed.size != 3 or not np.isfinite(params).all():
            raise ValueError('expected 12 parameters and a 3-D centre')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransformError(path, 'not a readable ITK affine transform (%s)'
                             % ' '.join(str(e).split())) from None
    a = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = params[9:] + fixed - a @ fixed
    return _from_itk(lps, path)


def load_transform(path):
    """Read ``path`` by its extension: ``.lta`` with :func:`read_lta`, an image
    (:data:`io.SUPPORTED`) with :func:`read_warp`. Raises :class:`TransformError` or
    :class:`io.VolumeError` (both ``ValueError``)."""
    path = os.fspath(path)
    if path.lower().endswith('.lta'):
        return read_lta(path)
    if path.lower().endswith(ITK_MATRIX_EXTS):
        return read_itk_affine(path)
    if io.split_ext(path)[1]:
        return read_warp(path)
    if not os.path.exists(path):
        raise TransformError(path, 'file not found')
    raise TransformError(path, 'unsupported transform file type (expected .lta, an ITK affine '
                         '%s, or a displacement image: %s)'
                         % ('/'.join(ITK_MATRIX_EXTS), ', '.join(io.SUPPORTED)))


# ---------------------------------------------------------------------------------------------
# applying

def apply(transform, volume, method='linear', fill=0, dtype=None):
    """Resample the moving image ``volume`` onto the transform's fixed grid.

    ``volume`` is an :class:`io.Volume` or ``(data, affine)``, 3-D or 4-D (frames last, each
    resampled alike). The output grid is the matrix transform's ``target`` (the LTA's dst volume;
    the moving image's own grid when that is unknown, as FreeSurfer does) or the warp's own grid.
    Each output voxel takes the moving image's value at its moving-world point (module
    docstring), in the moving voxels given by the image's affine.

    ``method`` ``'linear'`` interpolates trilinearly, ``'nearest'`` takes the nearest voxel
    (label maps stay exact). Points outside the box of the moving image's voxel centres (give or
    take 1e-5 voxel, so that rounding never drops a border slice) get ``fill``. The result has
    ``dtype`` (default: the input's; bool becomes uint8), float values rounded for integer
    types; a ``ValueError`` is raised if they do not fit.

    Returns ``(data, affine)``: the resampled array and the fixed grid's vox2world.
    """
    if method not in ('linear', 'nearest'):
        raise ValueError("method must be 'linear' or 'nearest', got %r" % (method,))
    data, affine, _ = _unpack(volume)
    if data.ndim not in (3, 4):
        raise ValueError('apply needs a 3-D or 4-D image, got shape %s' % (data.shape,))
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    if out_dtype == np.bool_:
        out_dtype = np.dtype(np.uint8)

    to_mov = np.linalg.inv(affine)
    if transform.is_warp:
        target = transform.target
        vox = to_mov @ target.affine
    else:
        target = transform.target or Geometry(data.shape[:3], affine)
        vox = to_mov @ np.linalg.inv(transform.matrix) @ target.affine
    out = _sample(data, target.shape, vox, transform.disp, to_mov[:3, :3], method, fill)
    return _cast(out, out_dtype), target.affine.copy()


def _sample(data, shape, vox, disp, disp_to_vox, method, fill):
    """Sample ``data`` at ``vox @ v (+ disp_to_vox @ disp[v])`` for every voxel ``v`` of a grid
    of ``shape``: moving voxel coordinates from a fixed-to-moving voxel matrix and, for warps,
    world displacements.

    Coordinates within :data:`_EDGE_TOL` voxel of the outermost voxel centres count as inside
    (so rounding errors never drop a border slice); points further out get ``fill``. The grid
    is processed in slabs of about :data:`_SLAB_VOXELS` voxels to bound memory, and each slab's
    coordinates serve every frame.
    """
    order = 1 if method == 'linear' else 0
    if order:
        src = data.astype(np.float32, copy=False)
    else:
        src = data.view(np.uint8) if data.dtype == np.bool_ else data
        if src.dtype.kind in 'iu' and not _fits(fill, src.dtype):
            src = src.astype(np.float64)  # keep fill exact; the caller's cast checks the range
    frames = [src] if src.ndim == 3 else [src[..., f] for f in range(src.shape[3])]
    frames = [np.ascontiguousarray(f) for f in frames]
    out = np.empty(tuple(shape) + src.shape[3:], dtype=src.dtype)
    upper = np.array(src.shape[:3], float)[:, None] - 1 + _EDGE_TOL

    step = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))
    jk = np.indices(shape[1:], dtype=np.float64).reshape(2, -1)
    for i0 in range(0, shape[0], step):
        i1 = min(i0 + step, shape[0])
        grid = np.vstack([np.repeat(np.arange(i0, i1, dtype=np.float64), jk.shape[1]),
                          np.tile(jk, i1 - i0)])
        coords = vox[:3, :3] @ grid + vox[:3, 3:]
        if disp is not None:
            coords += disp_to_vox @ disp[i0:i1].reshape(-1, 3).T.astype(np.float64)
        outside = ((coords < -_EDGE_TOL) | (coords > upper)).any(axis=0)
        for f, frame in enumerate(frames):
            # mode='nearest' only clamps the points within the tolerance; the rest get fill
            vals = ndimage.map_coordinates(frame, coords, order=order, mode='nearest',
                                           prefilter=False, output=src.dtype)
            vals[outside] = fill
            vals = vals.reshape((i1 - i0,) + tuple(shape[1:]))
            if src.ndim == 3:
                out[i0:i1] = vals
            else:
                out[i0:i1, ..., f] = vals
    return out


def _fits(value, dtype):
    """True if ``value`` is exactly representable in integer ``dtype``."""
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def _cast(arr, dtype):
    """``arr`` as ``dtype``, rounding floats for integer types and checking the range."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype == dtype:
        return arr
    if dtype.kind in 'iu':
        if arr.dtype.kind == 'f':
            arr = np.rint(arr)
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError('resampled values [%g, %g] do not fit in %s; choose a wider output '
                             'type' % (arr.min(), arr.max(), dtype))
    return arr.astype(dtype)


def header_only(transform, volume):
    """Move the image without resampling: ``(data, matrix @ affine)`` (``-H``).

    The voxels stay as they are; the new vox2world puts each of them where the matrix takes
    it, in the fixed image's world. Matrix transforms only (``ValueError`` for a warp).
    """
    if transform.is_warp:
        raise ValueError('header-only transforms need a matrix (.lta), not a displacement field')
    data, affine, _ = _unpack(volume)
    return data, transform.matrix @ affine
