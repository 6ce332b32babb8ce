"""The SD-1.5 speed benchmark runs its code paths at toy shapes on the CPU, so it cannot rot."""

import importlib.util
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
    methods = [(c.split("|")[1].strip(), c.split("|")[2].strip(), c.split("|")[3].strip()) for c in lines]
    assert methods == [
        ("sampling", "dyod t0=0.7", "2"), ("sampling", "diffusers img2img 0.7", "2"), ("sampling", "diffusers txt2img 50", "2"),
        ("dataset prompt", "dyod", "1"), ("dataset prompt", "diffusers example", "1"),
        ("dataset prompt", "dyod", "2"), ("dataset prompt", "diffusers example", "2"),
    ]
    assert all("×" in line for line in lines)  # every row has a ratio against its peer
