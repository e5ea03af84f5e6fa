"""AnyStory: personalized single- and multi-subject generation, encode-then-route (arXiv 2501.09503)."""
from .subjects import MAX_SUBJECTS, AlphaOrWholeImageSegmenter, PreparedSubject, Segmenter, Subject, prepare_subjects

__all__ = ["MAX_SUBJECTS", "AlphaOrWholeImageSegmenter", "PreparedSubject", "Segmenter", "Subject", "prepare_subjects"]
from .import_notices import drop_import_notices

drop_import_notices()
from .sdxl.adapter_sdxl import AnyStorySDXLAdapter
from .sdxl.pipeline_sdxl import AnyStoryPipelineOutput, AnyStorySDXLPipeline

__all__ += ["AnyStorySDXLAdapter", "AnyStoryPipelineOutput", "AnyStorySDXLPipeline"]
