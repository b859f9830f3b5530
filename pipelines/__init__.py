"""Apache Beam pipelines of kdstore: ``pipelines.capture`` is ``kd cache`` (teacher inference
over a corpus into a sparse soft-label store); ``pipelines.plain`` is the same capture as a
plain Python loop (the benchmark baseline)."""
