"""The training loop, its engine and optimizer, the non-finite policy, telemetry, fault injection."""
