"""What stands between the internet and the pools: API keys, per-key quotas, request limits."""
