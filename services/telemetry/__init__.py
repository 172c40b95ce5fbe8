"""Traces (OpenTelemetry), metrics (Ray's Prometheus export) and structured logs."""
