"""The background study's summary: per-mode intervals, and the paired difference against no reference."""
import numpy as np

from benchmarks.background_study import markdown_table, summarise


def _rows(seed: int = 0, pairs: int = 30):
    """Pairs whose leakage varies a lot from pair to pair, the reference adding exactly 0.01 to each."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(pairs):
        base = float(rng.uniform(0.0, 0.3))
        rows.append({"scene": 0.9,
                     "none": {"match": 0.1, "leakage": base, "named": [True, False], "colour": [True, True]},
                     "trained": {"match": 0.7, "leakage": base + 0.01, "named": [True, True], "colour": [True, False]}})
    return rows


def test_paired_difference_is_the_difference_of_means_and_sees_through_pair_noise():
    summary = summarise(_rows(), ["none", "trained"])
    diff = summary["trained"]["minus_none"]
    assert abs(diff["leakage"]["value"] - 0.01) < 1e-12
    assert diff["leakage"]["lo"] > 0.0099 and diff["leakage"]["hi"] < 0.0101  # the shift, without the pairs' spread
    none, trained = summary["none"]["leakage"], summary["trained"]["leakage"]
    assert none["lo"] < trained["value"] < none["hi"]  # unpaired, the intervals overlap and cannot tell
    assert abs(diff["match"]["value"] - 0.6) < 1e-12 and abs(diff["named"]["value"] - 0.5) < 1e-12
    assert abs(diff["colour"]["value"] + 0.5) < 1e-12
    assert "minus_none" not in summary["none"] and len(summary["per_pair"]) == 30
    table = markdown_table(summary, ["none", "trained"])
    assert "Paired difference" in table and "+0.010 [" in table


def test_no_paired_table_without_the_none_mode():
    summary = summarise(_rows(), ["trained"])
    assert "minus_none" not in summary["trained"]
    assert "Paired difference" not in markdown_table(summary, ["trained"])
