"""The SD-1.5 speed benchmark runs its code paths at toy shapes on the CPU, so it cannot rot."""

import importlib.util
import json
import sys
from pathlib import Path


def test_sd15_speed_tiny_prints_the_full_table(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sd15_speed.py"
    spec = importlib.util.spec_from_file_location("sd15_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    text = module.main(["--tiny", "--json", str(tmp_path / "rows.json")])
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert [tuple(c[:3]) for c in cells] == [
        ("sampling", "diffusers txt2img 50 steps", "2"), ("sampling", "diffusers img2img strength 0.7", "2"),
        ("sampling", "dyod t0=0.7", "2"),
        ("dataset prompt", "diffusers example", "1"), ("dataset prompt", "dyod", "1"),
        ("dataset prompt", "diffusers example", "2"), ("dataset prompt", "dyod", "2"),
        ("encode dataset (once)", "dyod, fp32 VAE", "2"),
        ("dataset prompt", "dyod + gradient checkpointing", "2"),
    ]
    for c in cells:  # every row measured; sampling and training rows carry a ratio against their diffusers peer
        assert float(c[3]) > 0
        assert c[4].startswith("×") or c[0] == "encode dataset (once)"
    assert cells[1][4] == "×1.00"  # the sampling peer is img2img at the same strength
    assert "(" in cells[2][5]  # dyod's row says how much of its time is the reverse process
    # The fast path computes what the fp32 path computes (on the CPU it is fp32 with channels-last and fused q/k/v).
    notes = json.loads((tmp_path / "rows.json").read_text())["notes"]
    errors = notes["faithfulness_relative_l2"]
    assert errors and all(0 <= e < 1e-4 for e in errors.values())
