"""The README's example output, taken from a fresh run of the demo.

    .venv/bin/python scripts/readme_example.py           # run the demo, rewrite the README block
    .venv/bin/python scripts/readme_example.py --check   # exit 1 if the README differs from the demo

The block is the demo's summary for its first queries and its fact-tracing line: the part of
what ``python -m jobs.pipeline`` prints that is the same on every run on one machine (the lines
after it carry timings, run ids and paths; on another CPU the scores move, see ``layout``).
``--check`` compares character for character; tests/test_readme.py compares layouts.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- demo output: scripts/readme_example.py -->", "<!-- end of demo output -->"
QUERIES_SHOWN = 2


def demo_output() -> str:
    """What the demo prints on stdout, run as the README says, into a fresh run directory."""
    with tempfile.TemporaryDirectory() as output_dir:
        result = subprocess.run(
            [sys.executable, "-m", "jobs.pipeline", f"output_dir={output_dir}"], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"the demo failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def example(output: str, queries: int = QUERIES_SHOWN) -> str:
    """The first ``queries`` query blocks, an ellipsis, and the fact-tracing line, indented as code."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\S+: '.*' -> '.*'$", line)]
    tracing = next(line for line in lines if line.startswith("(* = a true source)"))
    kept = lines[: starts[queries]] if len(starts) > queries else lines[: lines.index(tracing)]
    return "\n".join(f"    {line}" for line in [*kept, "...", tracing])


# A ranking row: flag, rank, score, document id and the start of its text.
ROW = re.compile(r"^\s+\*?\s+(\d+)\s+[+-]\d\.\d{3}e[+-]\d{2}\s+doc-\d+\s+\S.*$")


def layout(block: str) -> str:
    """The block with what the CPU moves masked: each ranking row's flag, score, document and text, and the
    fact-tracing line's figures. The demo model is trained on each machine, and another CPU's kernels round
    differently, so the scores and a rank or two differ there; the queries, the rows per query and every
    line's form do not."""
    lines = []
    for line in block.splitlines():
        row = ROW.match(line)
        if row is not None:
            lines.append(f"    rank {row.group(1)}: <score> <document>")
        elif "fact tracing" in line:
            lines.append(re.sub(r"\d+(\.\d+)?", "<n>", line))
        else:
            lines.append(line)
    return "\n".join(lines)


def readme_example(text: str) -> str:
    match = re.search(re.escape(BEGIN) + r"\n\n(.*?)\n\n" + re.escape(END), text, re.S)
    if match is None:
        raise RuntimeError(f"README.md has no block between {BEGIN!r} and {END!r}")
    return match.group(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    arguments = parser.parse_args()
    block = example(demo_output())
    text = README.read_text()
    if arguments.check:
        if readme_example(text) != block:
            print(f"README.md's demo output differs from the demo's:\n{block}", file=sys.stderr)
            return 1
        print("README.md's demo output is what the demo prints")
        return 0
    current = readme_example(text)
    README.write_text(text.replace(f"{BEGIN}\n\n{current}\n\n{END}", f"{BEGIN}\n\n{block}\n\n{END}"))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
