"""vLLM's own id mapping for a served draft with another vocabulary (`VocabMapping`, what
`use_heterogeneous_vocab` builds), run in the vLLM environment serve-check sets up: the yardstick
of specdraft's copy of the rule (drafts/vocab_map.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

VLLM_ENV = Path.home() / ".cache" / "specdraft" / "vllm-env"
VLLM_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from vllm.v1.spec_decode.vocab_mapping import VocabMapping
t = AutoTokenizer.from_pretrained(sys.argv[1]); d = AutoTokenizer.from_pretrained(sys.argv[2])
m = VocabMapping(t, d, int(sys.argv[3]), int(sys.argv[4]), "cpu")
print(json.dumps([m.target_to_draft_ids.tolist(), m.draft_to_target_ids.tolist()]))
"""

# The mark of a test that needs it (the integration tier, skipped where it is not installed).
needs_vllm = pytest.mark.skipif(
    not (VLLM_ENV / "bin" / "python").exists(), reason=f"no vLLM environment at {VLLM_ENV}"
)


def vllm_tables(target_dir: Path, draft_dir: Path, target_rows: int, draft_rows: int) -> list:
    """[target_to_draft, draft_to_target] as vLLM builds them from the saved tokenizers."""
    out = subprocess.run(
        [
            str(VLLM_ENV / "bin" / "python"),
            "-c",
            VLLM_SCRIPT,
            str(target_dir),
            str(draft_dir),
            str(target_rows),
            str(draft_rows),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
