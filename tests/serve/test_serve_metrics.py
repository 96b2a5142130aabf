"""``/metrics`` through prometheus-client: the output parses as the Prometheus text format, holds the
server's metrics under their names and the standard process / platform / GC collectors, label values are
escaped, and each app has its own registry."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

SERVER_METRICS = ("profusion_http_requests", "profusion_http_request_duration_seconds", "profusion_queue_depth",
                  "profusion_queue_wait_seconds", "profusion_batch_size_images", "profusion_batch_size_requests",
                  "profusion_images_generated", "profusion_runtime_seconds", "profusion_requests_rejected",
                  "profusion_requests_cancelled", "profusion_requests_timed_out", "profusion_jobs_failed",
                  "profusion_delta_swaps", "profusion_subjects_created", "profusion_requests_unauthorized",
                  "process_peak_resident_memory_bytes", "profusion_uptime_seconds")
STANDARD = ("process_resident_memory_bytes", "process_cpu_seconds", "python_info", "python_gc_objects_collected")


def test_metrics_parse_and_hold_every_metric(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in SERVER_METRICS + STANDARD:
        assert name in families, name
    assert families["profusion_http_request_duration_seconds"].type == "histogram"
    assert families["profusion_http_requests"].type == "counter"
    healthz = [s for s in families["profusion_http_requests"].samples
               if s.name == "profusion_http_requests_total" and s.labels == {"route": "/healthz", "status": "200"}]
    assert healthz and healthz[0].value >= 1
    rss = families["process_resident_memory_bytes"].samples  # the standard collector's, the only one
    assert len(rss) == 1 and rss[0].value > 10e6
    text = response.text
    assert text.count("# TYPE process_resident_memory_bytes ") == 1


def test_label_values_are_escaped_and_registries_are_private():
    from prometheus_client.parser import text_string_to_metric_families

    from profusion_rt.serve.metrics import Metrics

    a, b = Metrics(lambda: 3), Metrics(lambda: 0)
    nasty = 'quote " backslash \\ newline \n end'
    a.subjects_created.inc(2, nasty)
    a.failed.inc(1, "PromptError")
    a.batch_requests.observe(3)
    families = {f.name: f for f in text_string_to_metric_families(a.render())}
    created = [s for s in families["profusion_subjects_created"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in created] == [({"source": nasty}, 2.0)]
    assert families["profusion_queue_depth"].samples[0].value == 3
    assert a.subjects_created.value(nasty) == 2 and a.failed.value("PromptError") == 1
    snapshot = a.batch_requests.snapshot()
    assert snapshot[2] == 0 and snapshot[4] == 1 and snapshot[float("inf")] == 1
    assert b.subjects_created.value(nasty) == 0 and b.batch_requests.snapshot()[float("inf")] == 0  # not shared
