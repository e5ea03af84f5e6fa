"""The benchmarks measure what they claim: one row per configuration, reference passes counted from the encoders
that really ran, ratios against the bare pipeline of the same run, forwards timed through nesting."""
import math

import pytest
import torch

from benchmarks.common import ForwardTimer, interleaved

CONFIGS = ["bare diffusers", "anystory 0 subjects", "anystory 1 subjects", "anystory 2 subjects",
           "anystory 4 subjects"]


def _check(rows, backbone):
    assert [r["config"] for r in rows] == CONFIGS
    assert all(r["backbone"] == backbone for r in rows)
    assert [r["reference_passes_per_call"] for r in rows] == [0, 0, 1, 2, 4]
    assert rows[0]["step_ratio"] == rows[0]["step_min_ratio"] == 1.0
    assert all(0 < r["step_min_ms"] <= r["step_ms"] for r in rows)
    assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in rows)


def test_sdxl_tiny_pipeline_benchmark():
    from benchmarks.sdxl import run

    _check(run("tiny", "cpu", steps=1, repeats=1, height=64), "sdxl")


@pytest.mark.parametrize("references", ["segmented", "whole"])
def test_flux_tiny_pipeline_benchmark(references):
    """Besides the steps, the once-per-call work is timed apart: with subjects, the reference pass and every
    subject encoder ran; the bare pipeline and 0 subjects ran none of them. Each row says which share of its
    reference tokens was inside the masks: part of them for the segmented examples, all for unmasked images."""
    from benchmarks.flux import run

    rows = run("tiny", "cpu", steps=2, repeats=1, references=references)
    _check(rows, "flux")
    once = ["reference_pass_ms", "siglip_ms", "redux_ms", "router_tokens_ms", "vae_encode_ms"]
    for row in rows:
        assert all((row[c] > 0) == (row["subjects"] > 0) for c in once), row
        assert row["references"] == references
        share = row["reference_tokens_in_mask"]
        if not row["subjects"]:
            assert math.isnan(share)
        else:
            assert (0.3 < share < 0.9) if references == "segmented" else share == 1.0, row


def test_flux_benchmark_refuses_unknown_references():
    from benchmarks.flux import run

    with pytest.raises(ValueError, match="references must be one of"):
        run("tiny", "cpu", references="masked")


def test_unet_step_benchmark_on_a_small_unet():
    from anystory.sdxl.tiny_sdxl import TinySpec, tiny_sdxl_components
    from benchmarks.sdxl_unet_step import run

    unet = tiny_sdxl_components(0, TinySpec())["unet"]
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    rows = run(height=64, reference=32, subjects=(0, 2), steps=2, unet_config=config,
               adapter_config=dict(num_semantic_tokens=4, qformer_dim=32, qformer_depth=1, qformer_heads=2,
                                   routing_dim=16, router_dim=16))
    assert [r["config"] for r in rows] == ["bare diffusers", "anystory 0 subjects", "anystory 2 subjects"]
    assert all(math.isnan(r["reference_passes_per_call"]) for r in rows), "no encoder runs here: not a count"
    assert all(r["step_ms"] > 0 for r in rows)


def test_interleaved_rounds_and_nested_forwards():
    """Configs alternate within each round, each round starting one config later; a forward run inside another's pre-hook is timed on its own and
    dropped when ``skip`` says so, and the outer forward still gets its own time."""
    outer = torch.nn.Linear(2, 2)
    flag = {"inner": False}

    order, passes = [], [0]

    def config(label, n):
        def call(seed):
            order.append((label, seed))
            passes[0] += n
            outer(torch.zeros(1, 2))
        return label, n, call

    rows = interleaved([config("a", 0), config("b", 3)], outer, "cpu", repeats=2, passes=lambda: passes[0])
    assert order == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert [r["reference_passes_per_call"] for r in rows] == [0, 3]

    timer = ForwardTimer(outer, "cpu", skip=lambda: flag["inner"])

    def nested(module, args):
        if not flag["inner"]:
            flag["inner"] = True
            module(torch.zeros(1, 2))  # e.g. FLUX's reference pass through the same transformer
            flag["inner"] = False

    hook = outer.register_forward_pre_hook(nested)
    try:
        outer(torch.zeros(1, 2))
    finally:
        hook.remove()
        timer.remove()
    assert len(timer.times) == 1


@pytest.mark.parametrize("value,message", [("2,x", "comma-separated whole numbers"), ("0,5", "between 0 and 4")])
def test_subject_counts_are_checked(value, message, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--subjects", value, "--skip-eval"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_flux_layer_breakdown_on_a_tiny_transformer():
    """One row per block type and mode, ratios against the bare block of the same run, and the routed modes run
    the paths they name (sparse attention in ``routed``, the dense form in ``routed, dense``)."""
    import anystory.flux.attention_processor_flux as processor_module
    from anystory.flux.tiny_flux import tiny_anystory_flux_pipeline
    from benchmarks.flux_step_layers import MODES, run, summary

    sparse_calls = []
    real = processor_module.routed_attention
    processor_module.routed_attention = lambda *a: sparse_calls.append(1) or real(*a)
    try:
        table = run(subjects=2, repeats=1, grid=4, ref_grid=4, pipe=tiny_anystory_flux_pipeline(), text_len=8)
    finally:
        processor_module.routed_attention = real
    assert list(table["mode"]) == list(MODES) * 2 and list(table["block"]) == ["double"] * 6 + ["single"] * 6
    assert (table[table["mode"] == "bare"]["ratio"] == 1.0).all() and (table["ms"] > 0).all()
    # sparse in "routed, fixed maps", "routed" and "routed, redux step": 3 modes x 2 blocks x (the capturing
    # forward + the warm-up round + 1 timed round)
    assert len(sparse_calls) == 3 * 2 * 3
    assert len(summary(table)) == 3
