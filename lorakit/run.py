"""Moved to :mod:`lorakit.rundir`; shim: removed when the redesign merges."""

from lorakit.rundir import ADAPTER_CONFIG, METRICS_FILE, METRICS_LOG, RUN_FILE, check_output_dir, read_run, write_json_atomic  # noqa: F401, I001, E501  # fmt: skip
