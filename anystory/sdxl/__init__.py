"""The SDXL backbone as the paper describes it: ReferenceNet, QFormer, router, attention processors, pipeline."""
from .adapter_sdxl import AnyStorySDXLAdapter
from .pipeline_sdxl import AnyStoryPipelineOutput, AnyStorySDXLPipeline

__all__ = ["AnyStorySDXLAdapter", "AnyStoryPipelineOutput", "AnyStorySDXLPipeline"]
