"""Evaluation harness: face-ID, CLIP-I, CLIP-T, DINO and copy-paste scores on subject benchmarks.

Entry point: ``python -m eval.run`` (see :mod:`eval.run` and docs/evaluation.md). Layout: ``loaders/`` (one per
benchmark), ``metrics/`` (one per metric, one interface), ``methods`` (where images come from), ``generate``
and ``score`` (the two resumable stages), ``tables`` and ``report`` (outputs), ``data`` (DreamBench location).
"""
