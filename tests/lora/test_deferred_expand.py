"""A decode forward whose LoRA expands are deferred to the kernels that read their outputs
(LoRALinear.forward_deferred: the norms and SiLU-and-mul add the deltas) gives the same hidden
states as one that applies every expand itself. Every kernel runs interpreted, in a subprocess
(kernel files pick interpreted or compiled at import, and this process may have imported them
compiled)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from multilora_kernels._launch import INTERPRET_ENV

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "deferred_expand_forward.py"


def test_deferred_expand_gives_the_applied_expands_hidden_states():
    env = {**os.environ, INTERPRET_ENV: "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # The adapters matter (else equality would prove nothing), base rows do not see them.
    assert result["lora_vs_base"] > 1e-3 and result["base_rows_equal"], result
    # Deferred: q/k/v's expand alone is launched (2 layers); applied: all four projections'.
    for variant in ("per_token", "tiles"):
        assert (result[variant]["expand_launches_deferred"], result[variant]["expand_launches_applied"]) == (2, 8), result
    # Per token, the deferred delta is the per-token expand's own sum: bit for bit.
    assert result["per_token"]["equal"], result
    # Slot tiles sum the rank with tl.dot: within float32 rounding of the deferred FMAs.
    assert result["tiles"]["max_diff"] < 1e-6, result
