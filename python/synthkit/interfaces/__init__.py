"""Interfaces of the SynthKit tools for workflow engines: Nipype in
``synthkit.interfaces.nipype``."""
