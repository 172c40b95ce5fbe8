"""Tenant names reach the metrics only where settings ask: anyone who can scrape Ray's endpoint
would otherwise read each tenant's traffic."""

from __future__ import annotations

from services.settings import TelemetrySettings
from services.telemetry import metrics


def test_tenant_labels_read_all_unless_settings_ask():
    assert TelemetrySettings().tenant_labels is False
    counter = metrics.TenantCounter("small4_test_tenant_total", "test", ("tenant", "status"))
    try:
        metrics.show_tenants(False)
        counter.inc(tenant="acme", status="200")
        assert counter._local == {("all", "200"): 1.0}
        metrics.show_tenants(True)
        counter.inc(tenant="acme", status="200")
        assert counter._local[("acme", "200")] == 1.0
    finally:
        metrics.show_tenants(False)
    assert isinstance(metrics.REQUESTS, metrics.TenantCounter)
    assert isinstance(metrics.TENANT_TOKENS, metrics.TenantCounter)
