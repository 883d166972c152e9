"""One night of a sweep: find the shards not yet swept, score them, merge them into the kept top-k.

Layout of ``output_dir``::

    sweep_state.json                      the state (attribution.sweep.state): the commit point
    sweep.lock                            held while a sweep runs (attribution.sweep.lock)
    scores/sweep_date=D/<group>.parquet   the rows each night found (top-k over that night's shards)
    token_scores/sweep_date=D/<group>.parquet
    current/scores.parquet                the merged top-k (and bottom-k) over every swept shard
    current/token_scores.parquet
    runs/<run_id>.json                    the sweep's run record, and the score run's
    prefilter/<kind>/                     the prefilter index, when prefilter.path is unset
    archive/<epoch>/                      tables of an earlier model / factors / queries / settings
    .sweep/work/<key>/                    a night in progress (score markers and run); removed on commit

A night is committed by writing the state; part files the state does not list (a crash
between writing and committing) are removed by the next sweep, and the scoring of a crashed
night is found again under the same ``.sweep/work/<key>`` (resumed by ``run_score``'s
completion markers, or reused whole when it finished).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import Skip
from attribution.prefilter.index import update_index
from attribution.runs import RunRecord
from attribution.scoring.markers import run_key
from attribution.scoring.run import ShardFailure, run_score
from attribution.scoring.tables import SCORE_SCHEMA, TOKEN_SCHEMA, write_part
from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    RefineSettings,
    ScoreSettings,
    SettingsError,
)
from attribution.sweep.identity import describe_change, table_identity
from attribution.sweep.lock import LOCK_NAME, SweepLock
from attribution.sweep.merge import merge_tokens, merge_top, with_sweep_date
from attribution.sweep.settings import SweepSettings
from attribution.sweep.shards import (
    KnownShard,
    NightPlan,
    ShardFile,
    discover,
    plan_night,
)
from attribution.sweep.state import (
    STATE_NAME,
    Group,
    SweepState,
    load_state,
    save_state,
)

WORK_DIR = Path(".sweep") / "work"
TABLES = ("scores", "token_scores", "current")
# Schema metadata of current/scores.parquet: the groups it merges, so a night merges into it
# only when it matches the committed state (else it is rebuilt from the dated parts).
GROUPS_KEY = b"sweep_groups"


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message names the file, shard or setting and what to do."""


@dataclass
class ScoreRun:
    """The score run of a night: its tables and run record."""

    run_id: str
    scores: Path
    token_scores: Path | None
    record_path: Path
    record: dict[str, Any]


@dataclass
class SweepSummary:
    output_dir: Path
    sweep_date: str
    epoch: str
    plan: NightPlan
    fresh: bool = False
    noop: bool = False
    group: str | None = None
    rows_added: int = 0
    current_rows: int = 0
    run_record: Path | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def current_path(self) -> Path:
        return self.output_dir / "current" / "scores.parquet"

    def line(self) -> str:
        if self.noop:
            return f"sweep {self.sweep_date}: nothing new to sweep in {self.output_dir}"
        plan = self.plan
        return (
            f"sweep {self.sweep_date}: {len(plan.new)} new, {len(plan.changed)} rewritten, {len(plan.regrouped)} re-scored "
            f"with them, {len(plan.unchanged)} unchanged, {len(plan.missing)} missing shard(s); {self.rows_added} rows "
            f"added; current top-k {self.current_rows} rows -> {self.current_path}"
        )


def run_sweep(
    model: ModelSettings,
    data: DataSettings,
    factors: FactorSettings,
    queries: QuerySettings,
    score: ScoreSettings,
    output_dir: str | Path,
    config: dict[str, Any],
    sweep: SweepSettings = SweepSettings(),
    finetune: FinetuneSettings = FinetuneSettings(),
    prefilter: PrefilterSettings = PrefilterSettings(),
    cluster: ClusterSettings = ClusterSettings(num_workers=0),
    refine: RefineSettings = RefineSettings(),
) -> SweepSummary:
    """Sweep the shards of ``data.path`` not yet swept into the tables of ``output_dir`` (see the module doc)."""
    if model.path is None or data.path is None or queries.path is None:
        raise SettingsError("model.path, data.path and queries.path must be set (the jobs fill them in with the demo)")
    if score.method != "influence":
        raise SettingsError(f"score.method={score.method}: a sweep keeps influence tables; compare prefilter rankings "
                            "with jobs.score score.method=prefilter")
    if score.all_pairs:
        raise SettingsError("score.top_k=all: a sweep keeps merged top-k tables; write every pair with jobs.score")
    if cluster.allow_failed_shards:
        raise SettingsError("cluster.allow_failed_shards=true: a sweep commits whole nights, so a failing shard must be "
                            "fixed or moved out of data.path (a night's run record names it); set it to false")
    output_dir = Path(output_dir).absolute()
    # run_score runs in a work directory: resolve the paths it would otherwise place there.
    if factors.strategy != "identity":
        factors = replace(factors, path=str(Path(factors.path or output_dir / "factors").absolute()))
    if prefilter.kind != "none" or score.keep_sketches:
        kind = "gradient" if score.keep_sketches else prefilter.kind
        prefilter = replace(prefilter, path=str(prefilter.index_path(output_dir, kind).absolute()))
    with SweepLock(output_dir / LOCK_NAME, sweep.break_lock) as lock:
        night = _Night(model, data, factors, queries, score, output_dir, config, sweep, finetune, prefilter, cluster, refine)
        night.messages += lock.messages
        return night.run()


@dataclass
class _Night:
    model: ModelSettings
    data: DataSettings
    factors: FactorSettings
    queries: QuerySettings
    score: ScoreSettings
    output_dir: Path
    config: dict[str, Any]
    sweep: SweepSettings
    finetune: FinetuneSettings
    prefilter: PrefilterSettings
    cluster: ClusterSettings
    refine: RefineSettings
    messages: list[str] = field(default_factory=list)

    def run(self) -> SweepSummary:
        date = self.sweep.night()
        identity = table_identity(self.model, self.data, self.factors, self.queries, self.score, self.finetune,
                                  self.prefilter, self.refine)
        state = load_state(self.output_dir)
        fresh = state is None
        if state is not None and state.identity != identity:
            archive = self._archive(state)
            self.messages.append(
                f"starting a fresh table: {'; '.join(describe_change(state.identity, identity))}; "
                f"the previous table (epoch {state.epoch}) moved to {archive}"
            )
            state, fresh = None, True
        if state is None:
            state = SweepState.fresh(identity)
        self._remove_uncommitted_parts(state)
        shards = discover(str(self.data.path), state.shards, self.sweep.rehash)
        plan = plan_night(shards, state.shards, self.sweep.drop_missing_shards)
        dropped = [path for path in plan.missing if state.shards[path].group in plan.retired]
        kept_missing = sorted(set(plan.missing) - set(dropped))
        if kept_missing:
            self.messages.append(f"{len(kept_missing)} swept shard(s) no longer under {self.data.path}, their rows kept "
                                 f"(sweep.drop_missing_shards=true removes them): {', '.join(kept_missing)}")
        if dropped:
            self.messages.append(f"rows of {len(dropped)} missing shard(s) removed: {', '.join(dropped)}")
        summary = SweepSummary(self.output_dir, date, state.epoch, plan, fresh=fresh, messages=self.messages)
        if plan.nothing_to_do:
            summary.noop = True
            self.messages.append(f"nothing to sweep: all {len(shards)} shard(s) under {self.data.path} were swept, "
                                 f"last on {state.watermark.get('sweep_date')}")
            return summary
        if plan.changed:
            self.messages.append(f"{len(plan.changed)} shard(s) rewritten since they were swept; their rows are replaced: "
                                 f"{', '.join(plan.changed)}")

        record = RunRecord(job="sweep", config=self.config)
        record.fingerprints = {key: value for key, value in identity.items() if isinstance(value, str)}
        if self.prefilter.kind != "none":
            index = update_index(Path(str(self.prefilter.path)), self.prefilter, self.data,
                                 [Path(path) for path in sorted(shards)], record.skip, self.model,
                                 Path(self.factors.path) if self.factors.path is not None else None)
            self.messages.append(index.line())
        record.lap("prefilter")

        new_tables: list[pa.Table] = []
        new_tokens: list[pa.Table] = []
        group = None
        scored: ScoreRun | None = None
        if plan.pending:
            key = run_key({"identity": identity, "pending": [(path, shards[path].sha256) for path in plan.pending]})
            summary.group = f"{date}-{key[:12]}"
            scored = self._score(self.output_dir / WORK_DIR / key, plan.pending, identity)
            record.lap("score")
            for skip in scored.record.get("skips", []):
                record.skip(Skip(**skip))
            rows = pq.read_table(scored.scores).select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
            new_tables.append(rows)
            if scored.token_scores is not None:
                new_tokens.append(pq.read_table(scored.token_scores).select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA))
            summary.rows_added = rows.num_rows

        # Merge in memory first: a bad night (a duplicate document id) fails before any file is written.
        merged, merged_tokens = self._merge(state, plan, [with_sweep_date(t, date) for t in new_tables], new_tokens,
                                            summary.group)
        if scored is not None and summary.group is not None:
            part = write_part(new_tables[0], self.output_dir / "scores" / f"sweep_date={date}", summary.group)
            token_part = None
            if new_tokens:
                token_part = write_part(new_tokens[0], self.output_dir / "token_scores" / f"sweep_date={date}",
                                        summary.group)
            group = Group(date, plan.pending, scored.run_id, str(part.relative_to(self.output_dir)),
                          str(token_part.relative_to(self.output_dir)) if token_part else None, summary.rows_added)
            (self.output_dir / "runs").mkdir(parents=True, exist_ok=True)
            shutil.copy2(scored.record_path, self.output_dir / "runs" / scored.record_path.name)
        if merged_tokens is not None:
            write_part(merged_tokens, self.output_dir / "current", "token_scores")
        write_part(merged, self.output_dir / "current", "scores")
        record.lap("merge")
        self._commit(state, plan, shards, dropped, group, summary.group, date, record, merged)
        summary.current_rows = merged.num_rows
        record.counts = {"new": len(plan.new), "changed": len(plan.changed), "regrouped": len(plan.regrouped),
                         "unchanged": len(plan.unchanged), "missing": len(plan.missing), "dropped_missing": len(dropped),
                         "retired_groups": len(plan.retired), "rows_added": summary.rows_added,
                         "current_rows": merged.num_rows, "skipped": len(record.skips)}
        record.config["sweep"] = {"sweep_date": date, "epoch": state.epoch, "group": summary.group,
                                  "plan": asdict(plan), "messages": self.messages}
        record.outputs = {"current": str(summary.current_path), "state": str(self.output_dir / STATE_NAME)}
        summary.run_record = record.write(self.output_dir)
        return summary

    def _score(self, workdir: Path, pending: list[str], identity: dict[str, Any]) -> ScoreRun:
        """Score the pending shards in ``workdir``, or reuse the run a crashed sweep finished there."""
        scored = _finished_run(workdir)
        if scored is None:
            # A run finished with the same inputs is returned by run_score as it stands (reused).
            try:
                summary = run_score(self.model, self.data, self.factors, self.queries, self.score, workdir, self.config,
                                    self.finetune, self.prefilter, self.cluster, shards=[Path(path) for path in pending],
                                    refine_settings=self.refine)
            except ShardFailure as error:
                raise ShardFailure(f"{error}. A sweep commits whole nights: fix the shard or move it out of "
                                   f"{self.data.path}; finished units are kept and the rerun resumes") from error
            scored = _finished_run(workdir)
            if scored is None or scored.run_id != summary.run_id:
                raise SweepError(f"the score run {summary.run_id} in {workdir} left no run record with a score table")
        else:
            self.messages.append(f"resumed: reusing the finished score run {scored.run_id} of a crashed sweep")
        expected = {key: identity[key] for key in ("model", "finetune_model") if key in identity}
        got = {key: scored.record.get("fingerprints", {}).get(key) for key in expected}
        if got != expected:
            raise SweepError(f"the score run {scored.record_path} scored with model fingerprint(s) {got}, but the sweep "
                             f"fingerprinted {expected} (the model changed during the sweep?); nothing was committed")
        return scored

    def _merge(self, state: SweepState, plan: NightPlan, new: list[pa.Table], new_tokens: list[pa.Table],
               group_id: str | None) -> tuple[pa.Table, pa.Table | None]:
        """The current top-k (and its token scores): kept rows plus tonight's."""
        current_path = self.output_dir / "current" / "scores.parquet"
        live = [name for name in state.groups if name not in plan.retired]
        kept: list[pa.Table] = []
        kept_tokens: list[pa.Table] = []
        if not plan.retired and _merged_groups(current_path) == sorted(state.groups):
            # Nothing replaced: the kept top-k plus tonight's rows is the top-k over everything.
            kept.append(pq.read_table(current_path))
            if self.score.token_scores:
                kept_tokens.append(pq.read_table(self.output_dir / "current" / "token_scores.parquet"))
        else:
            # Rows of replaced groups may have pushed others out of the kept top-k: rebuild from the parts.
            for name in live:
                entry = state.groups[name]
                kept.append(with_sweep_date(pq.read_table(self.output_dir / entry.scores), entry.sweep_date))
                if self.score.token_scores and entry.token_scores:
                    kept_tokens.append(pq.read_table(self.output_dir / entry.token_scores))
        merged = merge_top(kept + new, self.score.top_k, self.score.bottom_k)
        groups = sorted(live + ([group_id] if group_id else []))
        merged = merged.replace_schema_metadata({GROUPS_KEY: json.dumps(groups)})
        tokens = merge_tokens(kept_tokens + new_tokens, merged) if self.score.token_scores else None
        return merged, tokens

    def _commit(self, state: SweepState, plan: NightPlan, shards: dict[str, ShardFile], dropped: list[str],
                group: Group | None, group_id: str | None, date: str, record: RunRecord, merged: pa.Table) -> None:
        """Write the state (the commit), then remove what it no longer lists."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for name in plan.retired:
            old = state.groups.pop(name)
            state.retired.append({"group": name, "sweep_date": old.sweep_date, "shards": old.shards, "replaced_on": date,
                                  "why": "a shard of the group was rewritten or removed"})
        for path in dropped:
            del state.shards[path]
        for path in plan.unchanged:  # a touched but unchanged file: remember its new stat, not to hash it again
            state.shards[path] = replace(state.shards[path], size=shards[path].size, mtime_ns=shards[path].mtime_ns)
        if group is not None and group_id is not None:
            state.groups[group_id] = group
            for path in plan.pending:
                shard = shards[path]
                state.shards[path] = KnownShard(shard.sha256, shard.size, shard.mtime_ns, group_id, date)
        state.watermark = {"sweep_date": date, "committed": now}
        state.nights.append({"sweep_date": date, "committed": now, "sweep_run": record.run_id, "group": group_id,
                             "score_run": group.run_id if group else None, "new": plan.new, "changed": plan.changed,
                             "regrouped": plan.regrouped, "missing": plan.missing, "dropped_missing": dropped,
                             "retired_groups": plan.retired, "rows_added": group.rows if group else 0,
                             "current_rows": merged.num_rows})
        save_state(self.output_dir, state)
        self._remove_uncommitted_parts(state)
        shutil.rmtree(self.output_dir / WORK_DIR, ignore_errors=True)

    def _remove_uncommitted_parts(self, state: SweepState) -> None:
        """Delete dated parts the state does not list: replaced groups, or a crashed night's uncommitted parts."""
        listed = {entry.scores for entry in state.groups.values()} | {
            entry.token_scores for entry in state.groups.values() if entry.token_scores}
        removed = []
        for table in ("scores", "token_scores"):
            for part in sorted((self.output_dir / table).glob("sweep_date=*/*.parquet")):
                if str(part.relative_to(self.output_dir)) not in listed:
                    part.unlink()
                    removed.append(str(part.relative_to(self.output_dir)))
            for partition in (self.output_dir / table).glob("sweep_date=*"):
                if partition.is_dir() and not any(partition.iterdir()):
                    partition.rmdir()
        if removed:
            self.messages.append(f"removed {len(removed)} part file(s) not in the committed table: {', '.join(removed)}")

    def _archive(self, state: SweepState) -> Path:
        """Move the tables and state of an earlier identity to ``archive/<epoch>/``."""
        archive = self.output_dir / "archive" / state.epoch
        suffix = 1
        while archive.exists():
            archive, suffix = self.output_dir / "archive" / f"{state.epoch}-{suffix}", suffix + 1
        archive.mkdir(parents=True)
        for name in (*TABLES, STATE_NAME):
            if (self.output_dir / name).exists():
                (self.output_dir / name).rename(archive / name)
        shutil.rmtree(self.output_dir / WORK_DIR, ignore_errors=True)
        return archive


def _merged_groups(current_path: Path) -> list[str] | None:
    """The groups ``current/scores.parquet`` merges, from its metadata; None when absent or unreadable."""
    if not current_path.is_file():
        return None
    metadata = pq.read_schema(current_path).metadata or {}
    return json.loads(metadata[GROUPS_KEY]) if GROUPS_KEY in metadata else None


def _finished_run(workdir: Path) -> ScoreRun | None:
    """The score run finished in ``workdir``: a run record whose score table exists (the last, if several)."""
    finished = []
    for path in sorted((workdir / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        scores = record.get("outputs", {}).get("scores")
        if scores and Path(scores).is_file():
            tokens = record["outputs"].get("token_scores")
            finished.append(ScoreRun(record["run_id"], Path(scores), Path(tokens) if tokens else None, path, record))
    return finished[-1] if finished else None
