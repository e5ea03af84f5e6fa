"""The typed training config: unknown keys and wrong types refused at every depth naming their path; ``--set``
reaches nested keys; every shipped config loads to the values the stages read."""
import glob
import os

import pytest

from anystory.training.config import Stage2Config, TrainingConfig, TrajectoryConfig, load_config
from anystory.training.runner import _parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
SMOKE = os.path.join(CONFIGS, "smoke.yaml")


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("stage3: {steps: 1}\n", "stage3: unknown key; known: backbone, seed,"),
    ("stage1: {stpes: 5}\n", "stage1.stpes: unknown key; known: steps, batch_size, lr,"),
    ("stage1: {train_unte: true}\n", "stage1.train_unte: unknown key; known: .*train_unet"),
    ("stage2: {trajectory: {classifier: c.safetensors, combine_wieght: 0.5}}\n",
     "stage2.trajectory.combine_wieght: unknown key; known: classifier, samples, .*combine_weight"),
    ("data: {stage3: x}\n", "data.stage3: unknown key; known: stage1, stage2, heldout, resolution"),
    ("flux: {rnak: 4}\n", "flux.rnak: unknown key; known: base, redux"),
    ("flux_router: {trian: [router]}\n", "flux_router.trian: unknown key"),
    ("world: {image_sise: 32}\n", "world.image_sise: unknown key; known: image_size"),
    ("model: {tiny_spec: {text_hiden: 8}}\n", "model.tiny_spec.text_hiden: unknown key"),
    ("model: {anystory: {router_dims: 8}}\n", "model.anystory.router_dims: unknown key; known: num_semantic_tokens"),
])
def test_unknown_keys_are_refused_at_every_level_naming_their_path(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(_yaml(tmp_path, text))
    assert "c.yaml" in str(err.value)  # and the file


@pytest.mark.parametrize("text, message", [
    ("seed: zero\n", "seed: expected an integer, got str 'zero'"),
    ("stage2: {lr: fast}\n", "stage2.lr: expected a number, got str 'fast'"),
    ("stage1: {train_unet: 1}\n", "stage1.train_unet: expected a boolean, got int 1"),
    ("stage1: {steps: true}\n", "stage1.steps: expected an integer, got bool True"),
    ("stage2: {subjects: [0.5, x]}\n", r"stage2.subjects\[1\]: expected a number"),
    ("stage2: {trajectory: {classifier: c, samples: many}}\n", "stage2.trajectory.samples: expected an integer"),
    ("stage2: {trajectory: 3}\n", "stage2.trajectory: expected a mapping, got int 3"),
    ("vae: 5\n", "vae: expected a mapping"),
    ("data: {resolution: big}\n", "data.resolution: expected an integer"),
    ("trackers: 3\n", "trackers: expected a string or a list of strings, got 3"),
])
def test_wrong_types_are_refused_naming_their_path(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_yaml(tmp_path, text))


def test_exponents_without_a_dot_read_as_numbers(tmp_path):
    """PyYAML reads ``1e-4`` as a string; the old loader's ``float(...)`` took it, so does the typed one."""
    cfg = load_config(_yaml(tmp_path, "stage2: {lr: 1e-4}\nflux_router: {lr: 3e-5}\n"))
    assert cfg.stage2.lr == 1e-4 and cfg.flux_router.lr == 3e-5 and isinstance(cfg.stage2.lr, float)


@pytest.mark.parametrize("text, message", [("stage2: {subject_gap: -1}\n", "stage2.subject_gap must be >= 0, got -1"),
                                           ("stage1: {routing_dilation: -2}\n", "stage1.routing_dilation must be >= 0")])
def test_negative_distances_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_yaml(tmp_path, text))


def test_a_trajectory_part_needs_its_classifier(tmp_path):
    with pytest.raises(ValueError, match="stage2.trajectory.classifier: required"):
        load_config(_yaml(tmp_path, "stage2: {trajectory: {samples: 4}}\n"))


def test_set_reaches_nested_keys_and_checks_them():
    args, _, overrides = _parse(["--config", SMOKE, "--set", "stage2.trajectory.classifier=c.safetensors",
                                 "--set", "stage2.trajectory.combine_weight=0.25", "--set", "stage1.steps=7",
                                 "--set", "model.anystory.router_dim=8", "--set", "stage2.single_region=true"])
    cfg = load_config(args.config, overrides)
    assert cfg["stage2"]["trajectory"]["combine_weight"] == 0.25 and cfg.stage2.trajectory.samples == 240
    assert cfg["stage1"]["steps"] == 7 and cfg["stage1"]["batch_size"] == 2  # the file's other values stay
    assert cfg["model"]["anystory"]["router_dim"] == 8 and cfg["model"]["anystory"]["qformer_dim"] == 32
    assert cfg["stage2"]["single_region"] is True
    args, _, overrides = _parse(["--config", SMOKE, "--set", "stage2.trajectory.combine_wieght=0.25"])
    with pytest.raises(ValueError, match="stage2.trajectory.combine_wieght: unknown key"):
        load_config(args.config, overrides)


def test_sections_read_and_write_as_mappings_with_checks():
    cfg = load_config(SMOKE)
    assert isinstance(cfg, TrainingConfig) and isinstance(cfg["stage2"], Stage2Config)
    assert cfg["stage2"] is cfg.stage2 and cfg.get("image_encoder") is None and cfg["stage1"].get("stop_after") is None
    assert dict(cfg["vae"]) == {"steps": 3, "batch_size": 4, "lr": 2e-3, "ema": 0.0, "gradient_accumulation": 1,
                                "weight_decay": 0.0, "stop_after": None, "basis_images": 64, "whiten": 0.5,
                                "object_weight": 0.0}
    cfg["stage1"]["lr"] = 1  # ints pass as numbers
    assert cfg.stage1.lr == 1.0 and isinstance(cfg.stage1.lr, float)
    with pytest.raises(ValueError, match="steps: expected an integer"):
        cfg["stage1"]["steps"] = "many"
    with pytest.raises(KeyError, match="stpes: unknown key"):
        cfg["stage1"]["stpes"] = 3
    again = load_config(SMOKE, dict(cfg, stage1=dict(cfg["stage1"], stop_after=2)))  # a loaded config as overrides
    assert again.stage1.stop_after == 2 and again.stage1.lr == 1.0 and again.vae == cfg.vae
    traj = load_config(SMOKE, {"stage2": {"trajectory": {"classifier": "c"}}}).stage2.trajectory
    assert traj == TrajectoryConfig(classifier="c")


def _values_the_stages_read(name):
    """The values the old loader (an untyped dict over DEFAULTS) gave for each shipped config, written out."""
    common = {"seed": 0, "find_unused_parameters": True, "base_model": None}
    return {
        "miniature_v1.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v1",
                              "export_dir": "runs/miniature_v1/export",
                              "trackers": "auto", "log_every": 10, "save_every": 50, "mixed_precision": None,
                              "world.identities": "all", "world.image_size": 64, "model.save_dtype": "float16",
                              "model.tokenizer_max_length": 32, "model.tiny_spec.vae_latent_channels": 8,
                              "model.anystory.reference_size": 64, "vae.steps": 700, "vae.basis_images": 512,
                              "vae.whiten": 0.5, "clip.lr": 2e-3, "base.ema": 0.99, "base.snr_gamma": 5.0,
                              "stage1.steps": 800, "stage1.lr": 1e-3, "stage1.train_unet": False,
                              "stage1.subjects": [0.5, 0.3, 0.2], "stage1.drop_semantic": 0.1,
                              "stage1.generic_caption": 0.6, "stage2.steps": 1500, "stage2.lr": 2e-3,
                              "stage2.routing_weight": 0.1, "stage2.logit_adjustment_tau": 1.15,
                              "stage2.single_region": True, "stage2.drop_text": 0.0, "stage2.subjects": [0.2, 0.4, 0.4],
                              "stage2.trajectory.samples": 240, "stage2.trajectory.iterations": 600,
                              "stage2.trajectory.lr": 1e-3, "stage2.trajectory.batch_size": 16,
                              "stage2.trajectory.classifier": "assets/miniature/identity_classifier.safetensors",
                              "stage2.trajectory.logit_adjustment_tau": 0.6, "stage2.trajectory.combine_weight": 0.5,
                              "background.steps": 200, "background.gate": True, "background.token_rank": 16,
                              "background.ip_rank": 64, "background.x0_colour_weight": 5.0,
                              "background.offset_noise": 0.1, "background.start": 1.0, "background.x0_max_t": 1000,
                              "background.background_loss_weight": 1.0, "background.subjects": [0.3, 0.4, 0.3],
                              "backbone": "sdxl"},
        "miniature_v2a.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2a", "vae.steps": 3000,
                               "vae.object_weight": 0.0, "base.steps": 6000, "base.ema": 0.99,
                               "model.tiny_spec.block_out_channels": [32, 64], "stage2.logit_adjustment_tau": 1.15},
        "miniature_v2b.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2b", "vae.steps": 3000,
                               "base.steps": 6000, "model.tiny_spec.block_out_channels": [48, 96],
                               "model.tiny_spec.attention_head_dim": [3, 6]},
        "miniature_v2c.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2c", "vae.steps": 3000,
                               "base.steps": 6000, "base.object_weight": 6.0, "base.snr_gamma": 5.0,
                               "model.tiny_spec.block_out_channels": [32, 64]},
        "miniature_v2d.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2d", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "model.tiny_spec.block_out_channels": [32, 64]},
        "miniature_v2g.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2g", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "base.steps": 30000},
        "miniature.yaml": {**common, "threads": 1, "work_dir": "runs/miniature", "export_dir": "assets/miniature",
                           "base.object_weight": 6.0,
                           "world.max_rotation": 15, "base.steps": 30000, "vae.steps": 6000,
                           "vae.object_weight": 4.0, "clip.steps": 3000, "stage1.steps": 2400,
                           "stage1.generic_caption": 1.0, "stage1.object_weight": 6.0,
                           "stage1.semantic_alignment": 1.0, "stage1.routing_dilation": 6,
                           "stage2.routing_dilation": 6, "stage2.logit_adjustment_tau_single": 0.0,
                           "stage2.subject_gap": 1},
        "miniature_v2i.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2i", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "world.max_subjects": 1},
        "miniature_v2j.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2j", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "model.tiny_spec.block_out_channels": [64, 128]},
        "miniature_v2h.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2h", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "model.scheduler.prediction_type": "v_prediction",
                               "model.scheduler.rescale_betas_zero_snr": True},
        "miniature_v2e.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2e", "base.object_weight": 6.0,
                               "world.max_rotation": 15, "model.tiny_spec.block_out_channels": [32, 64, 64],
                               "model.tiny_spec.attention_head_dim": [2, 4, 4]},
        "miniature_v2f.yaml": {**common, "threads": 1, "work_dir": "runs/miniature_v2f", "base.object_weight": 6.0,
                               "model.tiny_spec.vae_channels": [32, 32], "model.tiny_spec.vae_latent_channels": 8,
                               "model.tiny_spec.first_block_cross_attention": False},
        "smoke.yaml": {**common, "work_dir": "runs/smoke", "export_dir": "runs/smoke/export", "save_every": 2,
                       "log_every": 1, "vae.basis_images": 64, "stage1.steps": 3, "stage1.lr": 5e-4,
                       "stage2.lr": 1e-3, "stage2.trajectory": None, "background.steps": 0,
                       "model.anystory.num_semantic_tokens": 2, "data.stage1": None},
        "sdxl.yaml": {**common, "base_model": "stabilityai/stable-diffusion-xl-base-1.0", "threads": 8,
                      "mixed_precision": "bf16", "frozen_dtype": "bf16", "gradient_checkpointing": True,
                      "sample_every": 1000, "data.stage1": "shards/stage1", "data.resolution": 1024,
                      "model.anystory": {}, "stage1.gradient_accumulation": 4, "stage1.lr": 1e-5,
                      "stage1.subjects": [0.6, 0.3, 0.1], "stage2.steps": 20000, "stage2.subjects": [0.0, 0.6, 0.4],
                      "stage2.routing_weight": 0.1, "log_every": 50, "save_every": 1000},
        "flux.yaml": {**common, "backbone": "flux", "threads": 8, "mixed_precision": "bf16",
                      "gradient_checkpointing": True, "flux.dtype": "bfloat16", "flux.save_dtype": "bfloat16",
                      "flux.rank": 128, "flux.init_from": None, "flux.lora_bias": False, "flux.reference_size": 512,
                      "data.heldout": "data/flux/heldout", "flux_subject.steps": 20000,
                      "flux_subject.train": ["ref", "redux"], "flux_subject.subjects": [0.6, 0.3, 0.1],
                      "flux_subject.routing_weight": 0.0, "flux_router.steps": 10000, "flux_router.train": ["router"],
                      "flux_router.subjects": [0.0, 0.6, 0.4], "flux_router.routing_weight": 1.0,
                      "flux_router.guidance": 3.5, "flux_router.heldout_batches": 4, "save_every": 500},
        "flux_tiny.yaml": {**common, "backbone": "flux", "flux.base": "tiny", "flux.rank": 4,
                           "flux.max_sequence_length": 32, "flux.single_blocks": 2, "flux.dtype": "float32",
                           "world.reference_size": 32, "flux_subject.steps": 20, "flux_subject.lr": 1e-3,
                           "flux_router.batch_size": 2, "flux_router.train": ["router"],
                           "flux_router.subjects": [0.0, 0.6, 0.4], "flux_router.routing_weight": 1.0,
                           "flux_router.redux_scale": 1.0, "save_every": 10},
    }[name]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))), ids=os.path.basename)
def test_shipped_configs_load_to_the_values_the_stages_read(path):
    cfg = load_config(path)
    for dotted, expected in _values_the_stages_read(os.path.basename(path)).items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        assert node == expected and type(node) is type(expected), (dotted, node, expected)


def test_the_command_names_a_bad_key_without_a_traceback(tmp_path):
    from anystory.training.runner import run_stages

    with pytest.raises(SystemExit, match="error: training config .*smoke.yaml: stage1.stpes: unknown key"):
        run_stages(["--config", SMOKE, "--set", "stage1.stpes=3", "--set", f"work_dir={tmp_path}"])
    assert not os.listdir(tmp_path)  # stopped before anything ran
