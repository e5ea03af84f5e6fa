"""AnyStory for FLUX.1-dev: the authors' released weights in a diffusers pipeline."""
from .pipeline_flux import AnyStoryFluxPipeline, AnyStoryFluxPipelineOutput
from .weights_flux import AnyStoryWeightsError, AnyStoryWeightsWarning

__all__ = ["AnyStoryFluxPipeline", "AnyStoryFluxPipelineOutput", "AnyStoryWeightsError", "AnyStoryWeightsWarning"]
