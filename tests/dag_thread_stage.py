"""A stage module for the DAG tests that reports the intra-op threads torch computes with."""

import json


def run(cfg, inputs, ctx):
    import torch

    (ctx.out / "value.json").write_text(json.dumps(0))
    return {"threads": torch.get_num_threads()}
