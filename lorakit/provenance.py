"""Moved to :mod:`lorakit.rundir`; shim: removed when the redesign merges."""

from lorakit.rundir import PROVENANCE_FILE, base_fingerprint, check_base, config_fingerprint, read_provenance, write_provenance  # noqa: F401, I001, E501  # fmt: skip
