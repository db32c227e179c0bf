"""The size budget: no top-level source file over 500 non-blank lines (tinygrad's rule: it keeps
one file per concept readable in a sitting)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_source_file_over_500_non_blank_lines():
    sizes = {p.name: sum(1 for line in p.read_text().splitlines() if line.strip()) for p in ROOT.glob("*.py")}
    assert sizes, "no top-level .py files found"
    over = {name: n for name, n in sizes.items() if n > 500}
    assert not over, f"over the 500-line budget: {over}"
