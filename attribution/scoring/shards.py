"""One unit of scoring work: the queries of one pass against one corpus shard.

Per document batch, one forward and backward gives the (B, Q, M) layer scores of every query
of the pass (with a prefilter, of the queries whose candidates the batch holds; the others are
never used); they stay on the scoring device, where the top-k and bottom-k are kept
(:class:`~attribution.scoring.topk.TopK`), or, with ``score.top_k=all``, they are streamed to
the pass's pairs files. At the end the unit writes its kept rows, the token scores of its top
rows (a second forward and backward of just those documents), and last its completion marker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attribution.curvature.fit import Collective, in_lockstep
from attribution.data.batching import TokenBatch, batch_documents
from attribution.data.corpus import Document, Skip, SkipHandler, iter_documents
from attribution.prefilter.candidates import Candidates
from attribution.scoring.candidates import CandidateScorer
from attribution.scoring.markers import MarkerStore, UnitOutcome, WorkUnit
from attribution.scoring.tables import (
    UNIT_ROWS_SCHEMA,
    UNIT_TOKENS_SCHEMA,
    StreamedTable,
    float_lists,
    pairs_schema,
    strings,
    write_part,
)
from attribution.scoring.topk import ORDINAL_STRIDE, KeptRows, TopK
from attribution.settings import DataSettings, ScoreSettings
from attribution.sketch.riding import KeptSketches

NON_FINITE_DOCUMENT = "non-finite influence score (NaN or Inf in the document's gradient)"
# Test-only fault injection: "<target>:<index>:<exit|raise|hold>[:<flag file>]", the target a shard's
# file name (index = document batch) or "query-batch" (index = query batch). With a flag file
# the fault fires once (the file records that it did); without, on every attempt. "hold" needs
# the flag file: it writes this process's id there and waits until the process is killed (a
# test kills its node at a known point of the run).
FAULT_SWITCH = "ATTRIBUTION_TEST_FAULT"


@dataclass(frozen=True)
class Lockstep:
    """A worker of a sharded model: the run's collective, and a pass of the model that contributes
    nothing (the same gathers as a scoring pass), for the steps where this worker has no batch."""

    collective: Collective
    ghost: Callable[[TokenBatch], None]


@dataclass
class PassQueries:
    """The queries of one pass: their scorer, and the query batch each column range belongs to."""

    scorer: CandidateScorer
    batches: list[tuple[int, slice]]

    @property
    def query_ids(self) -> list[str]:
        return self.scorer.query_ids


class ShardScorer:
    """Scores units with the candidate model; one per process (the driver's or a worker's)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        data: DataSettings,
        score: ScoreSettings,
        candidates: Candidates | None,
        lockstep: Lockstep | None = None,
        kept: KeptSketches | None = None,
    ) -> None:
        """``kept``: with ``score.keep_sketches``, the gradient index the first pass adds each shard's sketches to."""
        self.kept = kept
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.score = score
        self.candidates = candidates
        self.lockstep = lockstep
        self.device = next(model.parameters()).device

    def _steps(self, batches: Iterable[TokenBatch]) -> Iterator[tuple[TokenBatch, bool]]:
        """``(batch, counts)``: every batch once, then, when the model is sharded, ghost batches that
        count for nothing until every worker of the run is done (their passes gather from this one)."""
        if self.lockstep is None:
            return ((batch, True) for batch in batches)
        return in_lockstep(batches, self.lockstep.collective, self.device)

    def keep_step(self) -> None:
        """A sharded worker with no unit this round: ghost passes until the others are done, in each phase they run."""
        assert self.lockstep is not None, "only a sharded worker keeps step"
        for batch, _ in self._steps(()):
            self.lockstep.ghost(batch.to(self.device))
        if not self.score.all_pairs and self.score.token_scores:
            for batch, _ in self._steps(()):
                self.lockstep.ghost(batch.to(self.device))

    def run(self, unit: WorkUnit, queries: PassQueries, store: MarkerStore) -> None:
        """Score the shard against every query of the pass and write the unit's files, the marker last."""
        started = time.perf_counter()
        query_ids = queries.query_ids
        outcome = UnitOutcome(scored_ids=[] if self.candidates is not None else None,
                              contraction_plan=dict(queries.scorer.plan))
        wanted = None if self.candidates is None else set(self.candidates.union(query_ids))
        documents = _Rows(self._documents(unit, wanted, outcome.skips.append))
        modules = len(queries.scorer.tracked)
        keep_layers = self.score.layer_scores
        top = bottom = None
        sketches = self.kept.shard(Path(unit.shard)) if self.kept is not None and unit.group == 0 else None
        with ExitStack() as files:
            pairs = []
            if self.score.all_pairs:
                schema = pairs_schema(keep_layers)
                pairs = [(columns, files.enter_context(StreamedTable(store.pairs_path(index, unit), schema)))
                         for index, columns in queries.batches]
            else:
                top = TopK(len(query_ids), int(self.score.top_k), True, modules, self.device, keep_layers)
                bottom = TopK(len(query_ids), self.score.bottom_k, False, modules, self.device, keep_layers)
            for index, (batch, counts) in enumerate(self._steps(self._batches(documents, outcome.skips.append))):
                if not counts:
                    queries.scorer.layer_scores(batch.to(self.device))
                    continue
                inject_fault_for_tests(Path(unit.shard).name, index)
                rows = np.array([documents.row_of(doc_id) for doc_id in batch.ids], dtype=np.int64)
                candidates = None if self.candidates is None else self.candidates.mask(query_ids, batch.ids)
                clock = time.perf_counter()
                capture = None if sketches is None else sketches.capture(len(batch.ids), self.device)
                layers = queries.scorer.layer_scores(batch.to(self.device), capture, wanted_columns(candidates))
                finite = torch.isfinite(layers).flatten(1).all(1).cpu().numpy()
                outcome.forward_backward_seconds += time.perf_counter() - clock
                for b in np.flatnonzero(~finite):
                    outcome.skips.append(Skip(batch.ids[b], unit.shard, int(rows[b]), NON_FINITE_DOCUMENT))
                kept = np.flatnonzero(finite)
                if sketches is not None:
                    sketches.keep(kept, [batch.ids[b] for b in kept], rows[kept], outcome.skips.append)
                if len(kept) == 0:
                    continue
                ids = [batch.ids[b] for b in kept]
                layers, rows = layers[torch.as_tensor(kept, device=self.device)], rows[kept]
                allowed = None if candidates is None else candidates[kept]
                outcome.documents_scored += len(ids)
                outcome.pairs_scored += int(allowed.sum()) if allowed is not None else len(ids) * len(query_ids)
                if outcome.scored_ids is not None:
                    outcome.scored_ids += ids
                for columns, writer in pairs:
                    writer.write(self._pair_rows(unit, query_ids[columns], ids, rows, layers[:, columns],
                                                 None if allowed is None else allowed[:, columns]))
                if top is not None and bottom is not None:
                    ordinals = torch.as_tensor(unit.shard_index * ORDINAL_STRIDE + rows)
                    mask = None if allowed is None else torch.as_tensor(allowed)
                    top.update(layers, ordinals, mask)
                    bottom.update(layers, ordinals, mask)
        rows_table = UNIT_ROWS_SCHEMA.empty_table()
        if top is not None and bottom is not None:
            positive = self._kept_rows(unit, "positive", query_ids, top.kept(), documents)
            rows_table = pa.concat_tables([positive, self._kept_rows(unit, "negative", query_ids, bottom.kept(), documents)])
            if self.score.token_scores:
                write_part(self._token_rows(unit, queries, positive), store.tokens_path(unit).parent,
                           store.tokens_path(unit).stem)
        if sketches is not None:
            sketches.write()
        outcome.seconds = time.perf_counter() - started
        store.write(unit, rows_table, outcome)

    def _documents(self, unit: WorkUnit, wanted: set[str] | None, on_skip: SkipHandler) -> Iterator[Document]:
        documents = iter_documents([Path(unit.shard)], self.data.id_field, self.data.text_field, on_skip=on_skip,
                                   on_bad_row=self.data.on_bad_row)
        return documents if wanted is None else (doc for doc in documents if doc.id in wanted)

    def _batches(self, documents: _Rows, on_skip: SkipHandler) -> Iterator[TokenBatch]:
        return batch_documents(self.tokenizer, documents, self.data.batch_size, self.data.max_length, on_skip)

    def _pair_rows(self, unit: WorkUnit, query_ids: list[str], doc_ids: list[str], rows: np.ndarray,
                   layers: torch.Tensor, allowed: np.ndarray | None) -> pa.Table:
        """Every allowed (document, query) pair of a batch, document-major."""
        values = layers.detach().to("cpu", torch.float32).numpy()
        totals = layers.sum(-1, dtype=torch.float64).cpu().numpy()
        mask = np.ones(totals.shape, dtype=bool) if allowed is None else allowed
        b, q = np.nonzero(mask)
        columns = {
            "query_id": strings(query_ids, q),
            "doc_id": strings(doc_ids, b),
            "score": pa.array(totals[b, q]),
        }
        if self.score.layer_scores:
            columns["layer_scores"] = float_lists(values[b, q])
        columns["shard"] = pa.repeat(pa.scalar(unit.shard), len(b))
        columns["row"] = pa.array(rows[b])
        return pa.table(columns)

    def _kept_rows(self, unit: WorkUnit, direction: str, query_ids: list[str], kept: KeptRows, documents: _Rows) -> pa.Table:
        q, j = np.nonzero(kept.valid.numpy())
        ordinals = kept.ordinals.numpy()[q, j]
        doc_ids = [documents.id_at(int(row)) for row in ordinals - unit.shard_index * ORDINAL_STRIDE]
        width = 0 if kept.layers is None else kept.layers.shape[-1]
        layers = np.zeros((len(q), 0), np.float32) if kept.layers is None else kept.layers.numpy()[q, j].reshape(-1, width)
        return pa.table(
            {
                "direction": pa.repeat(pa.scalar(direction), len(q)),
                "query": pa.array(q, pa.int32()),
                "query_id": strings(query_ids, q),
                "doc_id": pa.array(doc_ids, pa.string()),
                "score": pa.array(kept.scores.numpy()[q, j]),
                "layer_scores": float_lists(layers),
                "shard": pa.repeat(pa.scalar(unit.shard), len(q)),
                "ordinal": pa.array(ordinals, pa.int64()),
            },
            schema=UNIT_ROWS_SCHEMA,
        )

    def _token_rows(self, unit: WorkUnit, queries: PassQueries, positive: pa.Table) -> pa.Table:
        """Token-wise scores of the unit's top rows: one more forward and backward of just those documents."""
        columns_of: dict[str, list[int]] = {}
        for doc_id, column in zip(positive["doc_id"].to_pylist(), positive["query"].to_pylist()):
            columns_of.setdefault(doc_id, []).append(column)
        result: dict[str, list] = {name: [] for name in UNIT_TOKENS_SCHEMA.names}
        documents = _Rows(self._documents(unit, set(columns_of), _already_recorded))
        for batch, counts in self._steps(self._batches(documents, _already_recorded)):
            contributions = queries.scorer.token_scores(batch.to(self.device)).detach().to("cpu", torch.float32).numpy()
            if not counts:
                continue
            for b, doc_id in enumerate(batch.ids):
                length = int(batch.attention_mask[b].sum())
                tokens = self.tokenizer.convert_ids_to_tokens(batch.input_ids[b, :length].tolist())
                for column in columns_of[doc_id]:
                    result["query_id"].append(queries.query_ids[column])
                    result["doc_id"].append(doc_id)
                    result["tokens"].append(tokens)
                    result["token_scores"].append(contributions[b, :length, column])
        return pa.Table.from_pydict(result, schema=UNIT_TOKENS_SCHEMA)


def wanted_columns(candidates: np.ndarray | None) -> torch.Tensor | None:
    """The queries a batch's (documents, queries) candidate mask needs scores for; None: all of them."""
    if candidates is None or candidates.any(0).all():
        return None
    return torch.as_tensor(np.flatnonzero(candidates.any(0)))


class _Rows:
    """Documents as they stream into batching, remembering each one's row in its shard."""

    def __init__(self, documents: Iterator[Document]) -> None:
        self._documents = documents
        self._pending: dict[str, int] = {}
        self._ids: dict[int, str] = {}

    def __iter__(self) -> Iterator[Document]:
        for document in self._documents:
            self._pending[document.id] = document.row
            yield document

    def row_of(self, doc_id: str) -> int:
        row = self._pending.pop(doc_id)
        self._ids[row] = doc_id
        return row

    def id_at(self, row: int) -> str:
        return self._ids[row]


def _already_recorded(skip: Skip) -> None:
    """The scoring pass recorded this skip; the token pass reads the same documents again."""


def inject_fault_for_tests(target: str, index: int) -> None:
    """Exit, raise or hold at ``target``/``index`` when the test switch names them (see FAULT_SWITCH)."""
    switch = os.environ.get(FAULT_SWITCH)
    if not switch:
        return
    name, at, mode, *flag = switch.split(":")
    if name != target or int(at) != index:
        return
    if flag:
        if Path(flag[0]).exists():
            return
        if mode == "hold":
            _hold_until_killed(Path(flag[0]))
        Path(flag[0]).touch()
    if mode == "exit":
        os._exit(17)
    raise RuntimeError(f"injected test fault in {target} at {index}")


def _hold_until_killed(flag: Path) -> None:
    """Say which process holds (its id in ``flag``, written whole) and wait for it to be killed."""
    staged = flag.with_name(f"{flag.name}.partial")
    staged.write_text(str(os.getpid()))
    staged.replace(flag)
    threading.Event().wait()
