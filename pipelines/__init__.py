"""Apache Beam pipelines of kdstore: ``pipelines.capture`` is ``kd cache`` (teacher inference
over a corpus into a sparse soft-label store); ``pipelines.plain`` is the same capture as a
plain Python loop (the benchmark baseline)."""

import logging as _logging

# Beam logs these on the root logger of every run (importing its GCP I/O without the GCP
# extras; no `resource` module on the platform); they say nothing about the capture.
_BEAM_NOISE = ("apitools not found", "Resource module is not available")


class _DropBeamNoise(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BEAM_NOISE)


if not any(isinstance(f, _DropBeamNoise) for f in _logging.getLogger().filters):
    _logging.getLogger().addFilter(_DropBeamNoise())
