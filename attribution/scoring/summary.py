"""What a score run tells its caller: where its tables are, what it counted, one honest line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from attribution.scoring.tables import read_ranked
from attribution.scoring.topk import Ranked


@dataclass
class ScoreSummary:
    run_id: str
    method: str
    # The score table, or with score.top_k=all the pairs dataset directory.
    scores_path: Path
    token_scores_path: Path | None
    run_record: Path
    counts: dict[str, int]
    seconds: float
    # True when a finished run with the same inputs was found and nothing was scored again.
    reused: bool = False
    all_pairs: bool = False
    # With a prefilter, what each query was scored on, e.g. "bm25 top-100 candidates".
    candidates: str | None = None
    # What the user should know about the table (more rows asked for than documents, ...).
    notes: tuple[str, ...] = ()
    # How the queries were preconditioned: "closed form" or "refined by cg, at most 10 steps".
    query_side: str | None = None

    @cached_property
    def top(self) -> dict[str, list[Ranked]]:
        """The positive rows per query in rank order, read from the score table when first asked
        (none for the pairs dataset, which is unranked)."""
        return {} if self.all_pairs else read_ranked(self.scores_path)

    def line(self) -> str:
        if self.reused:
            return f"already scored with the same inputs by run {self.run_id}: nothing to do -> {self.scores_path}"
        counts = self.counts
        if self.candidates is None:
            scored = (f"scored {counts['queries_scored']} queries x {counts['documents_scored']} documents "
                      f"= {counts['pairs_scored']} pairs")
        else:
            scored = (f"scored {counts['pairs_scored']} (query, document) pairs: {counts['queries_scored']} queries, each on "
                      f"its {self.candidates} ({counts['documents_scored']} distinct documents of "
                      f"{counts['prefilter_searched_documents']} searched)")
        every = "; every pair, unranked, no token table" if self.all_pairs else ""
        query_side = f", {self.query_side}" if self.query_side else ""
        lines = [f"{scored} ({self.method}{query_side}{every}) in {self.seconds:.1f} s -> {self.scores_path}"]
        if counts.get("skipped"):
            lines.append(f"skipped {counts['skipped']} queries or documents, each with its file, row and reason "
                         f"in the run record {self.run_record}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def finished_summary(run_record: Path, method: str) -> ScoreSummary:
    """The summary of a finished run, read back from its record."""
    record = json.loads(run_record.read_text())
    outputs = record["outputs"]
    all_pairs = "pairs" in outputs
    scores_path = Path(outputs["pairs"] if all_pairs else outputs["scores"])
    tokens_path = Path(outputs["token_scores"]) if "token_scores" in outputs else None
    return ScoreSummary(record["run_id"], method, scores_path, tokens_path, run_record, record["counts"],
                        sum(record["timings"].values()), reused=True, all_pairs=all_pairs)
