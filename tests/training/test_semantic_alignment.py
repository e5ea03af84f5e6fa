"""Stage 1's optional pull of each subject's semantic tokens toward the prompt embeddings of its name
(``stage1.semantic_alignment``): zero at the name's embeddings, part of the loss when on, absent when off, and a
clear error for data whose references carry no names."""
import os
import types

import pytest
import torch

from anystory import AnyStorySDXLPipeline, Subject
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config
from anystory.training.data import source_for
from anystory.training.diffusion import training_scheduler
from anystory.training.loop import step_generator
from anystory.training.subject_step import semantic_alignment_loss, subject_step

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                     "smoke.yaml")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    cfg = load_config(SMOKE)
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.init_anystory(**anystory_config(cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _samples(*rows):
    return [types.SimpleNamespace(references=[Subject(None, name=name) for name in row]) for row in rows]


def test_the_loss_is_zero_at_the_names_embeddings_and_grows_away_from_them(pipe):
    names = [["red striped star", "blue moon"], ["green dotted heart", "yellow square"]]
    tokens = pipe.anystory.config.num_semantic_tokens
    with torch.no_grad():
        embeds = pipe.encode_prompt([n for row in names for n in row], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    at_names = embeds[:, 1:1 + tokens].reshape(2, 2, tokens, -1)
    assert semantic_alignment_loss(pipe, at_names, _samples(*names)).item() == 0.0
    swapped = at_names[:, [1, 0]]  # each subject given the other's tokens
    assert semantic_alignment_loss(pipe, swapped, _samples(*names)).item() > 0.0


def test_unnamed_references_are_refused_by_name(pipe):
    tokens = torch.zeros(1, 1, pipe.anystory.config.num_semantic_tokens, 8)
    with pytest.raises(ValueError, match="stage1.semantic_alignment needs every subject's name"):
        semantic_alignment_loss(pipe, tokens, _samples([""]))


def test_stage_one_adds_it_to_the_loss_only_when_weighted_and_it_trains_the_semantic_qformer(pipe):
    scheduler = training_scheduler(pipe)
    outs = {}
    for weight in (0.0, 0.5):
        cfg = load_config(SMOKE, {"stage1": {"semantic_alignment": weight}})
        pipe.anystory.zero_grad()
        torch.manual_seed(0)
        out = subject_step(cfg, "stage1", pipe, source_for(cfg, "stage1"), scheduler, 0, 2,
                           step_generator(cfg, "stage1", 0), teacher_routing=True)
        out["loss"].backward()
        outs[weight] = out
        grads = [p.grad for p in pipe.anystory.semantic_qformer.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    assert "alignment" not in outs[0.0] and torch.equal(outs[0.0]["loss"], outs[0.0]["diffusion"])
    on = outs[0.5]
    assert torch.equal(on["diffusion"], outs[0.0]["diffusion"]) and on["alignment"] > 0
    assert torch.allclose(on["loss"], on["diffusion"] + 0.5 * on["alignment"])
    pipe.anystory.zero_grad()
