"""Typed settings that jobs build from their Hydra config; the library reads only these.

Each dataclass mirrors one group under ``conf/`` field for field, so an unknown or
misspelt key fails loudly in :func:`from_mapping` instead of being ignored, and checks its
values when it is built (types, ranges, choices, and that input paths exist), before any
model is loaded: each mistake is one :class:`SettingsError` line naming the key, the value
and what is allowed (``score.rank=-1: expected a positive integer or null (full rank)``).
"""

from __future__ import annotations

import glob
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from attribution.curvature.strategies import STRATEGIES
from attribution.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class SettingsError(UserError, ValueError):
    """A configuration value that the library cannot use."""


def from_mapping(kind: type[T], values: Mapping[str, Any], group: str) -> T:
    """Build ``kind`` from a config group, naming the group in every error."""
    names = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise SettingsError(f"unknown key(s) in {group}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return kind(**dict(values))


# The floating-point dtypes by the names torch gives them; named here so that settings are
# checked before torch is imported (a job's mistakes are reported in well under a second).
FLOATING_DTYPES = ("float16", "bfloat16", "float32", "float64", "half", "float", "double")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SettingsError(f"{name!r} is not a torch floating-point dtype (float32, float64, bfloat16, ...)")
    return dtype


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class MissingPathError(SettingsError):
    """An input path that does not exist (on this machine: a cluster's volume may hold it)."""


def show(value: Any) -> str:
    """A value as it is written in an override: null, true/false, numbers, quoted strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


class Check:
    """Checks the fields of one settings object; every error names ``group.key`` and the value.

    Path existence is checked last (and raised as :class:`MissingPathError`), so a value
    error is never hidden behind a path that exists only elsewhere.
    """

    def __init__(self, group: str, settings: Any) -> None:
        self.group = group
        self.settings = settings
        self.paths: list[tuple[str, str]] = []

    def fail(self, key: str, expected: str) -> None:
        raise SettingsError(f"{self.group}.{key}={show(getattr(self.settings, key))}: expected {expected}")

    def integer(self, key: str, minimum: int, none: str | None = None) -> None:
        """An int >= ``minimum``; null too when ``none`` says what null means."""
        value = getattr(self.settings, key)
        if value is None and none is not None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
            self.fail(key, kind + (f" or null ({none})" if none else ""))

    def number(self, key: str, minimum: float = -math.inf, maximum: float = math.inf, positive: bool = False,
               none: str | None = None) -> None:
        """A finite int or float in ``[minimum, maximum]`` (``positive``: > 0); null when ``none`` is given."""
        value = getattr(self.settings, key)
        if value is None and none is not None:
            return
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not numeric or value < minimum or value > maximum or (positive and value <= 0):
            if positive:
                kind = "a positive number"
            elif maximum < math.inf:
                kind = f"a number from {minimum:g} to {maximum:g}"
            else:
                kind = f"a number >= {minimum:g}"
            self.fail(key, kind + (f" or null ({none})" if none else ""))

    def boolean(self, key: str) -> None:
        if not isinstance(getattr(self.settings, key), bool):
            self.fail(key, "true or false")

    def choice(self, key: str, choices: Sequence[Any]) -> None:
        if getattr(self.settings, key) not in choices:
            self.fail(key, "one of " + ", ".join(show(c) if not isinstance(c, str) else c for c in choices))

    def text(self, key: str, none: str | None = None) -> None:
        """A non-empty string; null when ``none`` says what null means."""
        value = getattr(self.settings, key)
        if value is None and none is not None:
            return
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string" + (f" or null ({none})" if none else ""))

    def dtype(self, key: str) -> None:
        value = getattr(self.settings, key)
        if value not in FLOATING_DTYPES:
            self.fail(key, "a torch floating-point dtype (float32, float64, bfloat16, float16)")

    def device(self, key: str) -> None:
        value = getattr(self.settings, key)
        if value in ("auto", "cpu"):
            return
        import torch

        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            self.fail(key, "auto or a torch device (cpu, cuda, cuda:1, mps, ...)")

    def regex(self, key: str) -> None:
        try:
            re.compile(getattr(self.settings, key))
        except re.error as error:
            self.fail(key, f"all, mlp or a valid regular expression ({error})")

    def address(self, key: str, also: Sequence[str] = ()) -> None:
        """An IP address (not 0.0.0.0 or ::, which are not an address to reach), or one of ``also``."""
        value = getattr(self.settings, key)
        if value in also:
            return
        try:
            valid = not ipaddress.ip_address(value).is_unspecified
        except (TypeError, ValueError):
            valid = False
        if not valid:
            self.fail(key, "an IP address such as 127.0.0.1" + "".join(f" or {a}" for a in also))

    def exists(self, key: str, kind: str = "path") -> None:
        """Queue an existence check: ``directory``, or ``path`` (a file, a folder or a glob that matches)."""
        value = getattr(self.settings, key)
        if value is None:
            return
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a path or null")
        self.paths.append((key, kind))

    def done(self) -> None:
        for key, kind in self.paths:
            value = getattr(self.settings, key)
            path = Path(value)
            if kind == "directory":
                found = path.is_dir()
            else:
                found = path.exists() or bool(set("*?[") & set(value) and glob.glob(value, recursive=True))
            if not found:
                what = "no such directory" if kind == "directory" else "no such file, folder or glob match"
                raise MissingPathError(f"{self.group}.{key}={value}: {what}")


@dataclass(frozen=True)
class ModelSettings:
    path: str | None = None
    tracked_modules: str = "all"
    trust_remote_code: bool = False
    dtype: str = "float32"
    device: str = "auto"
    # The memory one worker may use (GiB); the micro-batch is chosen to fit it (attribution.scale.plan).
    memory_gib: float | None = None

    def __post_init__(self) -> None:
        check = Check("model", self)
        check.exists("path", "directory")
        check.text("tracked_modules")
        if self.tracked_modules not in ("all", "mlp"):
            check.regex("tracked_modules")
        check.boolean("trust_remote_code")
        check.dtype("dtype")
        check.device("device")
        check.number("memory_gib", positive=True, none="no limit: data.batch_size as set")
        check.done()


ON_BAD_ROW = ("error", "skip")


@dataclass(frozen=True)
class DataSettings:
    path: str | None = None
    id_field: str = "id"
    text_field: str = "text"
    max_length: int = 128
    batch_size: int = 8
    # A row that cannot be read as a document: error (stop, naming file, row and line) or skip (record it).
    on_bad_row: str = "error"

    def __post_init__(self) -> None:
        check = Check("data", self)
        check.exists("path")
        check.text("id_field")
        check.text("text_field")
        if self.id_field == self.text_field:
            check.fail("text_field", f"a column other than data.id_field={self.id_field!r}")
        check.integer("max_length", 2)
        check.integer("batch_size", 1)
        check.choice("on_bad_row", ON_BAD_ROW)
        check.done()


@dataclass(frozen=True)
class FactorSettings:
    path: str | None = None
    strategy: str = "ekfac"
    fisher: bool | str = True
    damping: float | None = None
    max_sequences: int | None = None
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("factors", self)
        check.text("path", none="the job's default store")
        check.choice("strategy", STRATEGIES)
        # Hydra reads `factors.fisher=true` as a boolean.
        if self.fisher not in (True, "true", "empirical"):
            check.fail("fisher", "true (labels sampled from the model) or empirical (the data's own tokens)")
        check.number("damping", positive=True, none="0.1 x the mean eigenvalue of each module")
        check.integer("max_sequences", 1, none="the whole corpus")
        check.dtype("dtype")
        check.integer("seed", 0)

    def store_path(self, output_dir: str | Path) -> Path:
        """Where the factor store is: ``path``, else the job's own ``<output_dir>/factors``."""
        return Path(self.path) if self.path is not None else Path(output_dir) / "factors"


@dataclass(frozen=True)
class FinetuneSettings:
    """Set both paths for multi-stage scoring; ``damping`` is the fine-tuned stage's (null = heuristic)."""

    model_path: str | None = None
    factors_path: str | None = None
    damping: float | None = None

    def __post_init__(self) -> None:
        if (self.model_path is None) != (self.factors_path is None):
            raise SettingsError("multi-stage scoring needs both finetune.model_path and finetune.factors_path")
        check = Check("finetune", self)
        check.exists("model_path", "directory")
        check.text("factors_path", none="single-stage scoring")
        check.number("damping", positive=True, none="0.1 x the mean eigenvalue of each module")
        check.done()

    @property
    def enabled(self) -> bool:
        return self.model_path is not None


@dataclass(frozen=True)
class QuerySettings:
    path: str | None = None

    def __post_init__(self) -> None:
        check = Check("queries", self)
        check.exists("path")
        check.done()


@dataclass(frozen=True)
class ScoreSettings:
    rank: int | None = 32
    # A positive number of rows per query, or "all": every (query, document) pair, streamed to
    # the pairs dataset instead of a top-k table.
    top_k: int | str = 10
    bottom_k: int = 0
    query_batch_size: int = 16
    # Query batches that share one pass over the corpus (their factors held together).
    query_batches_per_pass: int = 1
    token_scores: bool = True
    # Keep the per-module split of each score (layer_scores column).
    layer_scores: bool = True
    # Memory the per-document contraction may spend on dense query factors, per worker.
    dense_factors_mib: int = 2048
    dtype: str = "float32"
    progress: bool = True
    # influence: I(q, z) on every document (or the prefilter's candidates); prefilter: the
    # prefilter's own ranking as the score table (method column = prefilter.kind), for comparison.
    method: str = "influence"
    # Every score divided by its document's gradient norm, I(q, z) / ||grad log p(z)|| (conf/score/default.yaml).
    normalize: bool = False
    # A pass over every document also adds each shard's gradient sketches to the gradient index
    # (prefilter.path; prefilter.sketch_* settings), from the same forward and backward.
    keep_sketches: bool = False

    @property
    def all_pairs(self) -> bool:
        """``top_k=all``: every pair is written, no ranking is kept."""
        return self.top_k == "all"

    def __post_init__(self) -> None:
        check = Check("score", self)
        check.integer("rank", 1, none="full rank")
        if self.top_k != "all" and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            check.fail("top_k", "a positive integer (rows per query) or all (every pair)")
        check.integer("bottom_k", 0)
        check.integer("query_batch_size", 1)
        check.integer("query_batches_per_pass", 1)
        check.boolean("token_scores")
        check.boolean("layer_scores")
        check.integer("dense_factors_mib", 0)
        check.dtype("dtype")
        check.boolean("progress")
        check.choice("method", ("influence", "prefilter"))
        check.boolean("normalize")
        check.boolean("keep_sketches")


REFINE_METHODS = ("auto", "none", "cg", "stochastic")


@dataclass(frozen=True)
class RefineSettings:
    """Query-side refinement of ``x = (G + D)^{-1} grad m(q)`` on the true Gauss-Newton matrix G of a
    document sample (all tracked modules, cross-module blocks included), preconditioned by EK-FAC and
    started from its closed form; mirrors conf/refine/default.yaml, except that the jobs' ``method`` is
    ``auto`` and the library's the closed form. ``auto`` is resolved when a score run starts
    (:meth:`resolved`). ``data_path`` / ``finetune_data_path``: the pretraining / fine-tuning stage's
    sample (null = the data recorded in that stage's factor store)."""

    method: str = "none"
    steps: int = 10
    batch_size: int = 8
    tolerance: float = 1e-3
    data_path: str | None = None
    finetune_data_path: str | None = None
    max_sequences: int | None = 64
    max_length: int | None = None
    cached_sequences: int | None = 64
    columns: int = 8
    workers: int = 0
    preconditioner_damping: float = 10.0
    learning_rate: float | None = None
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("refine", self)
        check.choice("method", REFINE_METHODS)
        check.integer("steps", 1)
        check.integer("batch_size", 1)
        check.number("tolerance", 0.0, 1.0, positive=True)
        check.exists("data_path")
        check.exists("finetune_data_path")
        check.integer("max_sequences", 1, none="every document of the sample")
        check.integer("max_length", 2, none="the sequence length of the stage's factor store")
        check.integer("cached_sequences", 0, none="every sequence of the sample")
        check.integer("columns", 1)
        check.integer("workers", 0)
        check.number("preconditioner_damping", positive=True)
        check.number("learning_rate", positive=True, none="2 (1 - momentum) / the largest eigenvalue of the preconditioned mini-batch systems")
        check.number("momentum", 0.0, 0.999)
        check.integer("seed", 0)
        check.done()

    @property
    def enabled(self) -> bool:
        return self.method in ("cg", "stochastic")

    def scoring_settings(self) -> dict[str, Any]:
        """The settings a refined score depends on: all but those that bound memory and time only
        (``cached_sequences``, ``columns``, ``workers`` and, for CG, whose products are sums over batches,
        ``batch_size``)."""
        memory_only = {"cached_sequences", "columns", "workers"} | ({"batch_size"} if self.method == "cg" else set())
        return {key: value for key, value in asdict(self).items() if key not in memory_only}

    def resolved(self, strategy: str, sharded: bool) -> RefineSettings:
        """``auto`` as what runs: cg where a fitted store preconditions the queries and every worker holds
        the whole model; the closed form for the gradient dot product (nothing to solve) and for a
        sharded model (the Gauss-Newton products need every parameter in one worker)."""
        if self.method != "auto":
            return self
        return replace(self, method="cg" if strategy != "identity" and not sharded else "none")


PREFILTER_KINDS = ("none", "tfidf", "bm25", "dense", "gradient")
DENSE_INDEX_TYPES = ("flat", "ivf", "hnsw")
# Bits per stored gradient-sketch coordinate: float16, or integer codes (attribution.sketch.codebook).
SKETCH_BITS = (16, 8, 4)


@dataclass(frozen=True)
class PrefilterSettings:
    """Candidate retrieval before influence scoring; mirrors conf/prefilter/default.yaml."""

    kind: str = "none"
    path: str | None = None
    top_m: int = 100
    n_features: int = 2**20
    k1: float = 1.2
    b: float = 0.75
    model: str | None = None
    device: str = "auto"
    index_type: str = "flat"
    nlist: int = 256
    nprobe: int = 16
    train_size: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    batch_size: int = 256
    # gradient: each module's sketch is sketch_dim x sketch_dim, its projections drawn from sketch_seed.
    sketch_dim: int = 64
    sketch_seed: int = 0
    # gradient: whiten both sides by the factor store's covariances (the index is then tied to that store).
    sketch_whiten: bool = True
    # gradient: keep each module's sketch as its C coordinates in the principal directions of the
    # sketches of sketch_basis_documents documents drawn at random (null, or at least sketch_dim^2: the whole sketch).
    sketch_components: int | None = 1536
    sketch_basis_documents: int = 8192
    # gradient: bits per stored coordinate: 16 (float16), or 8 or 4 (integer codes on each coordinate's range).
    sketch_bits: int = 4

    def __post_init__(self) -> None:
        check = Check("prefilter", self)
        check.choice("kind", PREFILTER_KINDS)
        check.text("path", none="<output_dir>/prefilter/<kind>")
        check.integer("top_m", 1)
        check.integer("n_features", 1)
        check.number("k1", minimum=0)
        check.number("b", minimum=0, maximum=1)
        check.exists("model", "directory")
        check.device("device")
        check.choice("index_type", DENSE_INDEX_TYPES)
        check.integer("nlist", 1)
        check.integer("nprobe", 1)
        check.integer("train_size", 1, none="64 x nlist")
        check.integer("hnsw_m", 2)
        check.integer("ef_construction", 1)
        check.integer("ef_search", 1)
        check.integer("batch_size", 1)
        check.integer("sketch_dim", 1)
        check.integer("sketch_seed", 0)
        check.boolean("sketch_whiten")
        check.integer("sketch_components", 1, none="all sketch_dim^2 numbers")
        check.integer("sketch_basis_documents", 1)
        check.choice("sketch_bits", SKETCH_BITS)
        check.done()

    @property
    def stored_components(self) -> int | None:
        """The principal coordinates a gradient index keeps per module; None: the whole ``sketch_dim^2``."""
        if self.sketch_components is None or self.sketch_components >= self.sketch_dim**2:
            return None
        return self.sketch_components

    @property
    def fits_sample(self) -> bool:
        """Whether creating a gradient index first sketches a sample of documents (for a basis or codes)."""
        return self.stored_components is not None or self.sketch_bits < 16

    def index_path(self, output_dir: str | Path, kind: str | None = None) -> Path:
        """Where the index lives: ``path``, else ``<output_dir>/prefilter/<kind>`` (this kind, or ``kind``)."""
        return Path(self.path) if self.path is not None else Path(output_dir) / "prefilter" / (kind or self.kind)


LOOPBACK = "127.0.0.1"
SHARDING_ENGINES = ("none", "fsdp", "deepspeed")


@dataclass(frozen=True)
class ClusterSettings:
    """``num_workers=0`` runs in this process without Ray (debugging, notebooks, tests)."""

    address: str | None = None
    num_workers: int = 2
    # Attempts per shard beyond the first, whether the worker raised or died.
    max_retries: int = 2
    # Finish with the shards that did succeed instead of failing the job.
    allow_failed_shards: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Shard the model's parameters over the workers for models too big for one worker:
    # none, fsdp (FSDP2) or deepspeed (ZeRO-3); fitting and scoring.
    sharding: str = "none"
    # The address of the local Ray this job starts (no address): 127.0.0.1 keeps every Ray port
    # on loopback; another address (or auto: Ray's pick) makes Ray listen on all interfaces.
    node_ip: str = LOOPBACK
    # Where the fit workers' rendezvous (torch.distributed store and gloo) listens: 127.0.0.1, or
    # node (the Ray node's address, for workers on several machines), or an address.
    listen: str = LOOPBACK

    def __post_init__(self) -> None:
        check = Check("cluster", self)
        check.text("address", none="a local Ray")
        check.integer("num_workers", 0)
        check.integer("max_retries", 0)
        check.boolean("allow_failed_shards")
        check.number("cpus_per_worker", minimum=0)
        check.number("gpus_per_worker", minimum=0)
        check.choice("sharding", SHARDING_ENGINES)
        if self.sharding != "none" and self.num_workers == 0:
            check.fail("sharding", "none when cluster.num_workers=0 (the model is sharded over the Ray workers; "
                                   "set cluster.num_workers to the number of shards)")
        check.address("node_ip", also=("auto",))
        check.address("listen", also=("node",))

    @property
    def uses_ray(self) -> bool:
        return self.num_workers > 0

    @property
    def sharded(self) -> bool:
        return self.sharding != "none"
