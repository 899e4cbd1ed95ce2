"""Monitor: readiness checks and drift monitoring (docs/operations.md, "Drift monitoring")."""
