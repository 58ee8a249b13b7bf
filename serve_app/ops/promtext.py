"""Prometheus text exposition format → flat samples (a thin wrapper over prometheus_client's parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serve_app.ops.cost import Sample


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a metrics snapshot (name with its _total/_bucket suffix, labels, value).

    Raises ValueError on text that is not in the exposition format.
    """
    samples: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.append(Sample(s.name, dict(s.labels), float(s.value)))
    return samples
