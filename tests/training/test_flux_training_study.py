"""What the FLUX training study measures with: the region terms (error, leakage share, leakage axis), the forced
routings it compares (ground truth, swapped), and the trainer's optional subject weighting of the loss."""
import numpy as np
import torch

from anystory.flux.pipeline_flux import AnyStoryFluxPipeline
from anystory.flux.tiny_flux import (TINY_REFERENCE_SIZE, random_released_state_dict, tiny_flux_components,
                                     tiny_redux_base)
from anystory.training.config import load_config
from anystory.training.data import SyntheticSource, world_for
from anystory.training.flux_step import (StepInputs, conditioned_prediction, encode_latents, encode_text,
                                         token_cover, token_weights, truth_maps)
from benchmarks.flux_training_study import region_terms


def test_region_terms_place_a_prediction_between_the_two_subjects():
    labels = torch.tensor([0, 0, 1, 1, -1])
    x0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [9.0, 9.0]])
    assert region_terms(x0, x0, labels) == (0.0, 0.0, 0.0)
    swapped = x0[[2, 3, 0, 1, 4]]  # each region predicted as the other subject
    error, leak, axis = region_terms(swapped, x0, labels)
    assert (error, leak, axis) == (2.0, 1.0, 1.0)
    mixed = torch.tensor([[0.6, 1.0], [0.6, 1.0], [1.4, -1.0], [1.4, -1.0], [0.0, 0.0]])  # 30% of the way across
    error, leak, axis = region_terms(mixed, x0, labels)
    assert leak == 0.0 and np.isclose(axis, 0.3) and np.isclose(error, np.hypot(0.6, 1.0))


def test_token_weights_favour_subject_tokens_with_mean_one():
    cover = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 1.0]])  # subject 0, 1, bg
    assert token_weights(cover, 0.0) is None
    weight = token_weights(cover, 6.0)[:, 0]
    assert weight.shape == (4,) and torch.isclose(weight.mean(), torch.tensor(1.0))
    assert torch.isclose(weight[0] / weight[2], torch.tensor(7.0)) and torch.isclose(weight[1] / weight[2],
                                                                                       torch.tensor(4.0))


def test_forced_routing_is_the_teachers_and_the_swapped_one_differs(tmp_path):
    """``maps``: the ground truth forced equals the subject stage's teacher routing bit for bit; the same maps
    with the subjects swapped send each region the other subject's tokens, so the prediction changes there."""
    cfg = load_config("configs/flux_tiny.yaml", {"work_dir": str(tmp_path), "trackers": []})
    pipe = AnyStoryFluxPipeline(**tiny_flux_components(0, 2), reference_size=TINY_REFERENCE_SIZE)
    pipe.load_anystory_weights(random_released_state_dict(pipe.transformer, seed=3), redux_base=tiny_redux_base())
    record = SyntheticSource(world_for(cfg)).record("stage2", 0, 2)
    embeds, pooled, text_ids = encode_text(pipe, [record.caption], 32)
    latents, img_ids, grid = encode_latents(pipe, [record.image])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    inputs = StepInputs(latents, noise, 0.6, embeds, pooled, text_ids, img_ids, grid, 7)
    scfg = cfg["flux_router"]
    truth = truth_maps(token_cover(record.routing_target(), grid))
    with torch.no_grad():
        teacher, logits = conditioned_prediction(pipe, scfg, record, inputs, teacher=True)
        forced, _ = conditioned_prediction(pipe, scfg, record, inputs, teacher=False, maps=truth)
        swapped, _ = conditioned_prediction(pipe, scfg, record, inputs, teacher=False, maps=truth.flip(0))
    assert logits is None and torch.equal(forced, teacher)
    subject_tokens = truth.sum(0) > 0
    assert not torch.allclose(swapped[0, subject_tokens], forced[0, subject_tokens])
