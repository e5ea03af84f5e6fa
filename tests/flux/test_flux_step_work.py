"""benchmarks.flux_step_layers --count: the work of a routed FLUX block, counted (load-independent), is what the
sparse routed attention should cost, exactly."""
import pytest

from anystory.flux.tiny_flux import tiny_anystory_flux_pipeline
from benchmarks.flux_step_layers import MODES, count

TEXT, GRID, REF_GRID, N = 8, 4, 4, 2


@pytest.fixture(scope="module")
def table():
    return count(subjects=N, grid=GRID, ref_grid=REF_GRID, pipe=tiny_anystory_flux_pipeline(), text_len=TEXT)


def _row(table, block, mode):
    return table[(table["block"] == block) & (table["mode"] == mode)].iloc[0]


def test_attention_flops_are_the_query_key_pairs_each_form_computes(table):
    """Bare: every token with every token. Routed with a fixed map (the image in two bands, one per subject):
    text rows see every key, each image row its own subject's reference only (the sparse form)."""
    heads, dim = 2, 16
    img, ref = GRID * GRID, REF_GRID * REF_GRID
    per_pair = 4 * heads * dim
    length = TEXT + img
    assert list(table["mode"]) == list(MODES) * 2
    for block in ("double", "single"):
        assert _row(table, block, "bare")["attention_gflop"] * 1e9 == length * length * per_pair
        routed = TEXT * (length + N * ref) + img * (length + ref)
        assert _row(table, block, "routed, fixed maps")["attention_gflop"] * 1e9 == routed * per_pair
        dense = length * (length + N * ref)
        assert _row(table, block, "routed, dense")["attention_gflop"] * 1e9 >= dense * per_pair


def test_router_adds_only_its_tokens_work(table):
    """The router's products are few-row ones; its matrix-product FLOPs are a small part of the block's."""
    for block in ("double", "single"):
        fixed, routed = _row(table, block, "routed, fixed maps"), _row(table, block, "routed")
        assert routed["small_matmul_weights_mb"] > fixed["small_matmul_weights_mb"]
        assert fixed["matmul_ratio"] == pytest.approx(1.0)
        assert 1.0 < routed["matmul_ratio"] < 1.0 + 4 * (N * 9) / (TEXT + GRID * GRID)


def test_masked_reference_columns_cost_no_attention():
    """With half of each subject's reference tokens outside its mask, the routed attention counts only the
    in-mask ones; the dense form (the release's arithmetic) still multiplies every column."""
    img, ref, heads, dim = GRID * GRID, REF_GRID * REF_GRID, 2, 16
    masked = count(subjects=N, grid=GRID, ref_grid=REF_GRID, pipe=tiny_anystory_flux_pipeline(), text_len=TEXT,
                   modes=("bare", "routed, fixed maps", "routed, dense"), in_mask=0.5)
    length, kept = TEXT + img, ref // 2
    for block in ("double", "single"):
        routed = TEXT * (length + N * kept) + img * (length + kept)
        assert _row(masked, block, "routed, fixed maps")["attention_gflop"] * 1e9 == routed * 4 * heads * dim
        dense = length * (length + N * ref)
        assert _row(masked, block, "routed, dense")["attention_gflop"] * 1e9 >= dense * 4 * heads * dim
