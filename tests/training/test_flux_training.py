"""FLUX training: what it writes is the release's file, what it trains is what the config says, and the step's
gradients do not depend on gradient checkpointing.

The authors' loader (``anystory/generate.py::load_anystory_model`` of junjiehe96/AnyStory) is re-derived below
from its source, without our loading code: ``load_lora_weights`` for the two LoRA groups, and
``load_state_dict(strict=False)`` of their redux/router embedders (``AnyStoryReduxImageEncoder``, built on
FLUX.1-Redux-dev's ``image_embedder``) and of the transformer for the processors' routing-map projections. A file
passes when no key is unexpected and every parameter those modules take from the file is in it.
"""
import warnings

import pytest
import torch
import torch.nn as nn
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict

from anystory.flux.pipeline_flux import AnyStoryFluxPipeline
from anystory.flux.release_export import initial_released_state_dict, released_state_dict
from anystory.flux.tiny_flux import (TINY_REFERENCE_SIZE, random_released_state_dict, tiny_flux_components,
                                     tiny_redux_base)
from anystory.flux.weights_flux import AnyStoryWeightsWarning, read_released_file
from anystory.training.config import load_config
from anystory.training.data import SyntheticSource, world_for
from anystory.training.flux_config import trained_parts
from anystory.training.flux_stages import freeze_all, trainable_parameters
from anystory.training.flux_step import flux_step
from anystory.training.runner import run_stages

TINY = "configs/flux_tiny.yaml"


def tiny_pipe(state=None, seed=0):
    pipe = AnyStoryFluxPipeline(**tiny_flux_components(0, 2), reference_size=TINY_REFERENCE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    state = state if state is not None else random_released_state_dict(pipe.transformer, seed=seed, lora_bias=True)
    pipe.load_anystory_weights(state, redux_base=tiny_redux_base())
    return pipe


# ---- the authors' loader, re-derived -------------------------------------------------------------------------------
class AuthorsProcessor(nn.Module):
    """``AnyStoryFluxAttnProcessor2_0.__init__``'s parameters (their attention_processor.py)."""

    def __init__(self, hidden, rank):
        super().__init__()
        self.to_q_routing_map_lora_A = nn.Linear(hidden, rank, bias=False)
        self.to_q_routing_map_lora_B = nn.Linear(rank, hidden, bias=True)
        self.to_k_routing_map_lora_A = nn.Linear(hidden, rank, bias=False)
        self.to_k_routing_map_lora_B = nn.Linear(rank, hidden, bias=True)

    def __call__(self, *args, **kwargs):  # never run here: only loaded
        raise AssertionError


class AuthorsEmbedder(nn.Module):
    """``AnyStoryReduxImageEncoder``'s parameters (their module.py): Redux's two layers, their LoRAs, the gate."""

    def __init__(self, redux_dim, text_dim, rank):
        super().__init__()
        self.redux_up, self.redux_down = nn.Linear(redux_dim, 3 * text_dim), nn.Linear(3 * text_dim, text_dim)
        self.redux_up_lora_A = nn.Linear(redux_dim, rank, bias=False)
        self.redux_up_lora_B = nn.Linear(rank, 3 * text_dim, bias=True)
        self.redux_down_lora_A = nn.Linear(3 * text_dim, rank, bias=False)
        self.redux_down_lora_B = nn.Linear(rank, text_dim, bias=True)
        self.gate_proj = nn.Linear(text_dim, 1)


BASE_KEYS = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}  # from_pretrained's


def authors_load(state: dict) -> dict:
    """What ``load_anystory_model`` reports loading ``state``: unexpected keys and keys it needed and lacked."""
    comps = tiny_flux_components(0, 2)
    flux = FluxPipeline(**{k: v for k, v in comps.items() if k not in ("image_encoder", "feature_extractor")})
    t = flux.transformer
    rank = state["router"]["transformer.transformer_blocks.0.attn.processor.to_q_routing_map_lora_A.weight"].shape[0]
    hidden = t.config.num_attention_heads * t.config.attention_head_dim
    for name in t.attn_processors:
        parent = t.get_submodule(name.rsplit(".", 1)[0])
        parent.processor = AuthorsProcessor(hidden, rank)
    report = {"unexpected": [], "missing": []}

    def lora(sd, adapter):
        flux.load_lora_weights(dict(sd), adapter_name=adapter)
        held = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(t, adapter_name=adapter).items()}
        report["unexpected"] += [k for k in sd if k not in held]
        report["missing"] += [k for k in held if k not in sd]
        report["mismatch"] = report.get("mismatch", []) + [k for k in sd if k in held and not torch.equal(held[k], sd[k])]

    def strict_false(module, sd, supplied_elsewhere=()):
        result = module.load_state_dict(sd, strict=False)
        report["unexpected"] += list(result.unexpected_keys)
        report["missing"] += [k for k in result.missing_keys if k not in supplied_elsewhere]

    lora(state["ref"], "ref_lora")
    redux_dim = state["redux"]["redux_up_lora_A.weight"].shape[1]
    text_dim = state["redux"]["gate_proj.weight"].shape[1]
    strict_false(AuthorsEmbedder(redux_dim, text_dim, state["redux"]["redux_up_lora_A.weight"].shape[0]),
                 state["redux"], BASE_KEYS)
    embedder, processors, router_lora = {}, {}, {}
    for k, v in state["router"].items():
        if k.startswith("router_embedder."):
            embedder[k[len("router_embedder."):]] = v
        elif "attn.processor" in k:
            processors[k[len("transformer."):]] = v
        else:
            router_lora[k] = v
    strict_false(AuthorsEmbedder(redux_dim, text_dim, embedder["redux_up_lora_A.weight"].shape[0]), embedder,
                 BASE_KEYS)
    processor_keys = {k for k in t.state_dict() if ".attn.processor." in k}
    strict_false(t, processors, [k for k in t.state_dict() if k not in processor_keys])
    lora(router_lora, "router_lora")
    return report


def test_the_authors_loader_check_rejects_a_file_it_should():
    state = random_released_state_dict(tiny_flux_components(0, 2)["transformer"], lora_bias=True)
    bad = {g: dict(sd) for g, sd in state.items()}
    bad["router"].pop("transformer.single_transformer_blocks.1.attn.processor.to_k_routing_map_lora_B.bias")
    bad["redux"]["gate_proj.extra"] = torch.zeros(1)
    report = authors_load(bad)
    assert report["missing"] == ["single_transformer_blocks.1.attn.processor.to_k_routing_map_lora_B.bias"]
    assert report["unexpected"] == ["gate_proj.extra"]


@pytest.mark.parametrize("start", ["random", "fresh"])
def test_written_file_is_the_release_layout(tmp_path, start):
    """A trained pipeline's file: the authors' loader loads it with nothing missing or unexpected, ours loads it
    strictly (no warning), and it holds exactly what the pipeline holds."""
    transformer = tiny_flux_components(0, 2)["transformer"]
    state = (random_released_state_dict(transformer, lora_bias=True) if start == "random"
             else initial_released_state_dict(transformer, 16, 4, seed=1))
    pipe = tiny_pipe(state)
    path = pipe.save_anystory_weights(str(tmp_path))
    assert path.endswith("anystory_flux.bin")
    written = read_released_file(path)  # torch.load(weights_only=True)
    assert {g: sorted(sd) for g, sd in written.items()} == {g: sorted(sd) for g, sd in state.items()}
    assert all(torch.equal(written[g][k], state[g][k]) for g in state for k in state[g])
    report = authors_load(written)
    assert report["unexpected"] == [] and report["missing"] == [] and report["mismatch"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnyStoryWeightsWarning)
        again = tiny_pipe(str(tmp_path))
    out = released_state_dict(again)
    assert all(torch.equal(out[g][k], state[g][k]) for g in state for k in state[g])


def test_lora_scaling_is_folded_into_b(tmp_path):
    """A file with ``.alpha`` keys (scaling alpha/r) is written without them and computes the same."""
    state = random_released_state_dict(tiny_flux_components(0, 2)["transformer"], lora_bias=True)
    key = "transformer.transformer_blocks.0.attn.to_q"
    state["ref"][f"{key}.alpha"] = torch.tensor(8.0)  # rank 4: scaling 2
    pipe = tiny_pipe(state)
    written = released_state_dict(pipe)
    assert not any(k.endswith(".alpha") for k in written["ref"])
    assert torch.equal(written["ref"][f"{key}.lora_B.weight"], state["ref"][f"{key}.lora_B.weight"] * 2)
    assert torch.equal(written["ref"][f"{key}.lora_B.bias"], state["ref"][f"{key}.lora_B.bias"] * 2)


def test_trained_parts_by_config():
    pipe = tiny_pipe()
    assert trained_parts(["router"]) == ("router_lora", "router_embedder", "routing_map")
    with pytest.raises(ValueError, match="unknown trainable part 'unet'"):
        trained_parts(["unet"])
    names = lambda parts: {n.split(".")[0] + ("/ref" if "anystory_ref" in n else "/router" if "anystory_router" in n  # noqa: E731
                                              else "/map" if "routing_map" in n else "") for n in
                           trainable_parameters(pipe, trained_parts(parts))}
    assert names(["ref"]) == {"transformer/ref"}
    assert names(["redux"]) == {"redux_embedder"}
    assert names(["router"]) == {"transformer/router", "transformer/map", "router_embedder"}


def _cfg(tmp_path, **overrides):
    return load_config(TINY, {"work_dir": str(tmp_path), "trackers": [], **overrides})


def _grads(pipe, cfg, stage, checkpointing):
    freeze_all(pipe)
    params = trainable_parameters(pipe, trained_parts(["ref", "redux", "router"]))
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    if checkpointing:
        from anystory.training.flux_checkpointing import enable

        enable(pipe)
    else:
        pipe.transformer.disable_gradient_checkpointing()
    out = flux_step(cfg, stage, pipe, SyntheticSource(world_for(cfg)), 0, 1, torch.Generator().manual_seed(0),
                    count=2)
    out["loss"].backward()
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("stage", ["flux_subject", "flux_router"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, stage):
    """Re-running each block in backward restores the block's state (router tokens, reference pass and its
    adapter): the gradients of every trained part equal those without checkpointing."""
    torch.manual_seed(0)
    cfg = _cfg(tmp_path)
    pipe = tiny_pipe(seed=2)
    plain = _grads(pipe, cfg, stage, False)
    ckpt = _grads(pipe, cfg, stage, True)
    assert pipe.transformer.is_gradient_checkpointing
    assert set(plain) == set(ckpt) and len(plain) > 40
    parts = {n.split(".lora")[0].split(".")[0] for n in plain}
    assert {"transformer", "redux_embedder"} <= parts and (stage == "flux_subject") != ("router_embedder" in parts)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fine_tuning_starts_from_a_released_file_and_trains_only_its_parts(tmp_path):
    """``flux.init_from``: the stage starts from the file's weights; the parts not in ``train`` come out bit for
    bit as they went in, the trained ones changed; the output loads strictly."""
    released = random_released_state_dict(tiny_flux_components(0, 2)["transformer"], seed=4, std=0.05)
    torch.save(released, tmp_path / "anystory_flux.bin")
    work = tmp_path / "run"
    assert run_stages(["--config", TINY, "--stages", "flux_subject", "--set", f"work_dir={work}", "--set",
                       "trackers=[]", "--set", f"flux.init_from={tmp_path / 'anystory_flux.bin'}", "--set",
                       "flux_subject.steps=3", "--set", "flux_subject.train=[redux]", "--set", "log_every=1",
                       "--set", "flux_subject.heldout_batches=0"],
                      log=lambda *_: None) == 0
    out = read_released_file(str(work / "flux_subject" / "anystory" / "anystory_flux.bin"))
    assert all(torch.equal(out[g][k], released[g][k]) for g in ("ref", "router") for k in released[g])
    changed = [k for k in released["redux"] if not torch.equal(out["redux"][k], released["redux"][k])]
    assert len(changed) == len(released["redux"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnyStoryWeightsWarning)
        tiny_pipe(str(work / "flux_subject" / "anystory"))


def test_flux_stages_belong_to_a_flux_config(tmp_path):
    with pytest.raises(SystemExit, match="not stages of backbone 'sdxl'"):
        run_stages(["--config", "configs/smoke.yaml", "--stages", "flux_router", "--set", f"work_dir={tmp_path}"])


def test_a_trained_file_loads_with_from_released(tmp_path):
    """Training on a FLUX folder and a Redux folder (the full-size loading path, with the tiny models saved), then
    ``from_released`` with the same folders and the trained file: loaded strictly, and it generates."""
    from helpers.flux_pipe import CALL, PROMPT, gen, subjects

    components = tiny_flux_components(0, 2)
    FluxPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
                 ).save_pretrained(tmp_path / "flux")
    components["image_encoder"].save_pretrained(tmp_path / "redux" / "image_encoder")
    tiny_redux_base().save_pretrained(tmp_path / "redux" / "image_embedder")
    work = tmp_path / "run"
    assert run_stages(["--config", TINY, "--stages", "flux_router", "--set", f"work_dir={work}", "--set",
                       "trackers=[]", "--set", f"flux.base={tmp_path / 'flux'}", "--set",
                       f"flux.redux={tmp_path / 'redux'}", "--set", "flux.reference_size=32", "--set",
                       "flux_router.steps=2", "--set", "flux_router.heldout_batches=0"], log=lambda *_: None) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnyStoryWeightsWarning)
        pipe = AnyStoryFluxPipeline.from_released(str(tmp_path / "flux"), str(tmp_path / "redux"),
                                                  str(work / "flux_router" / "anystory" / "anystory_flux.bin"),
                                                  torch_dtype=torch.float32, reference_size=TINY_REFERENCE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, subjects=subjects(2), generator=gen(), return_routing_maps=True, **CALL)
    assert out.images.shape == (1, 32, 32, 3) and len(out.routing_maps) == CALL["num_inference_steps"]


def test_a_stopped_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    """The SDXL trainer's checkpoints serve the FLUX stages: stopped after a step and run again, ``flux_router``
    ends with the very file an uninterrupted run writes."""
    def run(work, *extra):
        return run_stages(["--config", TINY, "--stages", "flux_router", "--set", f"work_dir={work}", "--set",
                           "trackers=[]", "--set", "flux_router.steps=3", "--set", "flux_router.heldout_batches=0",
                           "--set", "flux_router.batch_size=1", *extra], log=lambda *_: None)

    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "parts", "--set", "flux_router.stop_after=1") == 0
    assert not (tmp_path / "parts" / "flux_router" / "anystory").exists()
    assert run(tmp_path / "parts") == 0
    a, b = (read_released_file(str(tmp_path / w / "flux_router" / "anystory" / "anystory_flux.bin"))
            for w in ("whole", "parts"))
    assert all(torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])
