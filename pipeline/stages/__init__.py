"""The stages: one module each, `run(cfg, inputs, out, *, seed) -> dict`; no stage imports another."""
