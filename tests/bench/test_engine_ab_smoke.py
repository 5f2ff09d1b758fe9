"""bench/engine_ab.py --tiny: two variants in their own processes on the CPU, and one that cannot start.

Values checked, never times: the figures are for GPUs, this only keeps the benchmark working.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

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


def test_a_variant_of_another_source_tree_runs_that_trees_engine(tmp_path):
    tree = tmp_path / "tree"
    for part in ("backend_src", "kernels", "bench"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    report = engine_ab.main(["--tiny", "--variant", "here", "--variant", f"copy@{tree}", "--cases", "base",
                             "--out", str(tmp_path)])
    runs = {r["variant"]: r for r in report["runs"]}
    assert runs["copy"]["error"] is None and runs["copy"]["figures"]["base"] > 0
    assert runs["copy"]["engine_source"] == str(tree / "backend_src" / "multilora")
    assert runs["copy"]["kernels_source"] == str((tree / "kernels").resolve())
    assert runs["here"]["engine_source"] != runs["copy"]["engine_source"]


def test_a_tree_without_the_sources_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="must hold backend_src"):
        engine_ab.parse_variant(f"old@{tmp_path}")
