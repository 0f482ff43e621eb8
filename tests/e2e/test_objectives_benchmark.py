"""benchmarks/objectives.py runs end to end at its --tiny setting: three objectives x two seeds, scored."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_objectives_benchmark_tiny_writes_a_table_for_every_objective(tmp_path):
    spec = importlib.util.spec_from_file_location("objectives_benchmark", ROOT / "benchmarks" / "objectives.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "objectives_tiny.json"
    result = benchmark.main(["--tiny", "--root", str(tmp_path / "root"), "--output", str(output)])
    assert json.loads(output.read_text())["table"].keys() == benchmark.OBJECTIVES.keys()
    assert {run["prediction_type"] for run in result["runs"]} == {"epsilon", "flow", "edm"}
    assert len(result["runs"]) == 6
    for run in result["runs"]:
        assert 0.0 <= run["adherence_all"] <= 1.0 and run["fid"] >= 0.0
