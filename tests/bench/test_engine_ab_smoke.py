"""bench/engine_ab.py --tiny: two variants in their own processes on the CPU, and one that cannot start.

Values checked, never times: the figures are for GPUs, this only keeps the benchmark working.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import engine_ab  # noqa: E402

SETTING = "multilora.lora.lora_linear.DEFERRED_EXPAND_MAX_TOKENS"


def test_tiny_variants_run_apart_and_report_each_case(tmp_path):
    report = engine_ab.main(["--tiny", "--variant", "today", "--variant", f"no-deferral:{SETTING}=0",
                             "--variant", "broken:multilora.lora.lora_linear.NO_SUCH_CONSTANT=1",
                             "--cases", "base,8,closed", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "engine_ab.json").read_text()).keys() == report.keys()
    runs = {r["variant"]: r for r in report["runs"]}
    assert runs["today"]["settings_read_back"] == {} and runs["no-deferral"]["settings_read_back"] == {SETTING: 0}
    for name in ("today", "no-deferral"):
        assert runs[name]["error"] is None and set(runs[name]["figures"]) == {"base", "8", "closed"}
        assert all(v > 0 for v in runs[name]["figures"].values())
    # A variant that cannot start fails alone, saying why; the others' figures stand.
    assert runs["broken"]["figures"] is None and "has no NO_SUCH_CONSTANT" in runs["broken"]["error"]
    summary = {row["variant"]: row for row in report["summary"]}
    assert summary["broken"]["repeats"] == 0 and summary["broken"]["base"] is None
    assert summary["today"]["8_over_base"] == summary["today"]["8"] - summary["today"]["base"]


@pytest.mark.parametrize("text", ["name:no_equals_sign", "name:NOMODULE=1"])
def test_a_variant_without_module_and_value_is_refused(text):
    with pytest.raises(SystemExit, match="MODULE.NAME=VALUE"):
        engine_ab.parse_variant(text)
