"""Study-scale processing on Dask: any SynthKit tool over thousands of scans.

``synthkit.batch.run(tool, inputs, outputs, client=...)`` runs ``tool`` (``'mri_synthseg'``,
``'mri_synthstrip'``) over a folder, BIDS dataset or list of scans, resumably, on a Dask
client of the caller's (or a LocalCluster of this machine); ``synthkit-batch`` is its command
line. See docs/batch.md.
"""

from .engine import Summary, run  # noqa: F401
from .tools import TOOLS  # noqa: F401
