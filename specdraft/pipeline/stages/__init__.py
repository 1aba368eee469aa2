"""The stages: one module each, `run(cfg, inputs, ctx: StageContext) -> dict`; no stage imports another."""
