"""Write the "Official recipes" section of docs/tables.md from the paper grids (grid.recipe and
grid.differences), so the documentation lists exactly what the tests check.

    python scripts/recipes_md.py            # rewrite docs/tables.md between its markers
    python scripts/recipes_md.py --check    # exit 1 if docs/tables.md is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from diffq_bench import io
from diffq_bench.config import find_conf_dir

BEGIN, END = "<!-- recipes:begin (scripts/recipes_md.py) -->", "<!-- recipes:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "tables.md"


def section() -> str:
    parts = [BEGIN, ""]
    for path in sorted((find_conf_dir() / "grid").glob("table_*.yaml")):
        grid = OmegaConf.to_container(OmegaConf.load(path).grid, resolve=False)
        parts += [f"### {grid['name']} (`conf/grid/{path.name}`)", "",
                  "| runs | key | value | source |", "|---|---|---|---|"]
        for item in grid.get("recipe") or []:
            parts.append(f"| `{item['runs']}` | `{item['key']}` | `{item['value']}` | {item['source']} |")
        parts += ["", "Deliberate differences:", ""]
        parts += [f"- {d}" for d in grid.get("differences") or ["none"]]
        parts.append("")
    return "\n".join(parts + [END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/tables.md is current")
    args = parser.parse_args()
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{DOC} lacks the markers {BEGIN} ... {END}")
    new = text[:text.index(BEGIN)] + section() + text[text.index(END) + len(END):]
    if args.check:
        sys.exit(0 if new == text else f"{DOC} is out of date: run python scripts/recipes_md.py")
    io.write_text(DOC, new)


if __name__ == "__main__":
    main()
