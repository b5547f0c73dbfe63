"""Graph -> graph passes, listed in order in ``pipeline.PIPELINE``. Imports only llamagraph.ir."""

from .pipeline import FUSION_PASSES, PASS_NAMES, PIPELINE, change_note, run_pipeline

__all__ = ["FUSION_PASSES", "PASS_NAMES", "PIPELINE", "change_note", "run_pipeline"]
