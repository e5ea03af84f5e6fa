"""Builders the tests share (tiny pipelines, reference images, eval data); not tests themselves."""
