"""Real model sizes on a small machine: rehearsal models at real widths, a memory and time model per
stage, and the benchmark that checks one against the other (docs/scale.md)."""
