"""Typed settings of the evaluate job; each mirrors a section of conf/evaluate.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attribution.curvature.strategies import STRATEGIES
from attribution.settings import REFINE_METHODS, SettingsError, from_mapping

METHOD_KINDS = (*STRATEGIES, "lissa", "block_exact", "refined")
# Methods defined on one stage only: they have no multi-stage form.
SINGLE_STAGE_KINDS = ("lissa", "block_exact")
REFINE_SAMPLES = ("fit", "held_out")
STAGES = ("single", "multi")
GROUND_TRUTH_KINDS = ("cg", "dense")
PRECONDITIONERS = ("ekfac", "none")


@dataclass(frozen=True)
class MethodSpec:
    """One compared method.

    ``kind``: a factor strategy (``ekfac``, ``kfac``, ``diagonal``), ``identity`` (gradient
    dot product), ``lissa`` or ``block_exact`` (the exact inverse of G's module-diagonal
    blocks, by CG per module to the ground truth's tolerance: a per-module method with no
    error inside a module). ``rank``: the query-factor rank of the scoring engine (null =
    full). ``tracked_modules``: ``all``, ``mlp`` or a regex; the ground truth always uses all.
    LiSSA only: ``batch_size`` sequences per stochastic product, ``max_iterations`` (null =
    run for the overhead time of method ``equal_time_to``), ``scale`` (null = twice the
    largest eigenvalue of one mini-batch's G, by power iteration).

    ``refined``: the engine's query-side refinement (``refine.*``) of the EK-FAC closed form:
    ``solver`` (``cg`` or ``stochastic``), at most ``steps`` Gauss-Newton products per query and
    stage, ``tolerance``, ``batch_size`` (stochastic mini-batch), ``preconditioner_damping``,
    ``learning_rate``, ``momentum``; ``sample``: ``fit`` refines on the same sequences as the
    ground truth's G (the solver's accuracy), ``held_out`` on as many other ones (what a
    different sample of the same data costs); ``curve``: also a row per step count listed here
    (single-stage; one solve, its iterates at those counts).
    """

    name: str
    kind: str
    rank: int | None = None
    tracked_modules: str = "all"
    batch_size: int = 8
    max_iterations: int | None = None
    equal_time_to: str | None = "ekfac"
    scale: float | None = None
    solver: str = "cg"
    steps: int = 20
    tolerance: float = 1e-3
    preconditioner_damping: float = 10.0
    learning_rate: float | None = None
    momentum: float = 0.9
    sample: str = "fit"
    curve: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise SettingsError(f"method {self.name}: kind={self.kind!r}; expected one of {', '.join(METHOD_KINDS)}")
        if self.solver not in REFINE_METHODS[1:]:
            raise SettingsError(f"method {self.name}: solver={self.solver!r}; expected one of {', '.join(REFINE_METHODS[1:])}")
        if self.sample not in REFINE_SAMPLES:
            raise SettingsError(f"method {self.name}: sample={self.sample!r}; expected one of {', '.join(REFINE_SAMPLES)}")
        if any(not isinstance(k, int) or k < 0 for k in self.curve):
            raise SettingsError(f"method {self.name}: curve={list(self.curve)}; expected step counts >= 0")
        if self.steps < 1:
            raise SettingsError(f"method {self.name}: steps={self.steps}; expected a positive integer")
        if self.kind == "lissa" and self.max_iterations is None and self.equal_time_to is None:
            raise SettingsError(f"method {self.name}: LiSSA needs max_iterations or equal_time_to")


@dataclass(frozen=True)
class GroundTruthSpec:
    """``cg``: multi-shift conjugate gradient on Gauss-Newton-vector products, stopped at a
    relative residual of ``tolerance`` for every damping; ``dense``: the explicit G and a
    dense solve (models with at most ``max_dense_parameters`` tracked parameters).
    ``preconditioner``: ``ekfac`` (CG preconditioned by the EK-FAC fit, one run per damping)
    or ``none`` (multi-shift CG); it changes the speed, not the solution. Defaults mirror
    conf/evaluate.yaml."""

    kind: str = "cg"
    preconditioner: str = "none"
    tolerance: float = 1e-2
    max_iterations: int = 300
    max_dense_parameters: int = 6000

    def __post_init__(self) -> None:
        if self.kind not in GROUND_TRUTH_KINDS:
            raise SettingsError(f"ground_truth.kind={self.kind!r}; expected one of {', '.join(GROUND_TRUTH_KINDS)}")
        if self.preconditioner not in PRECONDITIONERS:
            raise SettingsError(f"ground_truth.preconditioner={self.preconditioner!r}; expected one of {', '.join(PRECONDITIONERS)}")


@dataclass(frozen=True)
class DampingSpec:
    """Absolute damping values, or multiples of the mean eigenvalue of G when ``relative``.

    The first value is the headline; the others form the sweep. Every method uses the
    same lambda (the gradient dot product has none).
    """

    values: tuple[float, ...] = (10.0, 100.0, 1.0)
    relative: bool = True

    def __post_init__(self) -> None:
        if not self.values or min(self.values) <= 0:
            raise SettingsError(f"damping.values must be positive, got {list(self.values)}")


@dataclass(frozen=True)
class EvaluationSettings:
    """What is evaluated, on which data."""

    fit_sequences: int = 64
    num_queries: int | None = 8
    # single: the model's own G; multi: fine-tuned model's queries, G_ft on its fine-tuning rows, then G_pt.
    stages: str = "single"
    finetune_model_path: str | None = None
    finetune_data_path: str | None = None
    correlation_documents: int = 200
    bm25_top: int = 100
    random_documents: int = 100
    recall_k: int = 10
    batch_size: int = 32
    seed: int = 0
    progress: bool = True
    damping: DampingSpec = field(default_factory=DampingSpec)
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    methods: tuple[MethodSpec, ...] = ()
    # Pairs (method, reference) whose scores are correlated with each other, e.g. rank 32 vs full rank.
    compare: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> EvaluationSettings:
        """Build from the ``evaluate`` config section (plain mappings and lists)."""
        values = dict(values)
        damping = values.pop("damping", {}) or {}
        damping = from_mapping(DampingSpec, {**damping, "values": tuple(damping.get("values", DampingSpec().values))}, "evaluate.damping")
        truth = from_mapping(GroundTruthSpec, values.pop("ground_truth", {}) or {}, "evaluate.ground_truth")
        methods = tuple(
            from_mapping(MethodSpec, {"name": name, **(spec or {}), "curve": tuple((spec or {}).get("curve", ()) or ())},
                         f"evaluate.methods.{name}")
            for name, spec in (values.pop("methods", {}) or {}).items()
        )
        compare = tuple(tuple(pair) for pair in values.pop("compare", ()) or ())
        settings = from_mapping(cls, {**values, "damping": damping, "ground_truth": truth, "methods": methods, "compare": compare}, "evaluate")
        names = {m.name for m in methods}
        if settings.stages not in STAGES:
            raise SettingsError(f"evaluate.stages={settings.stages!r}; expected one of {', '.join(STAGES)}")
        if settings.stages == "multi":
            for method in methods:
                if method.kind in SINGLE_STAGE_KINDS:
                    raise SettingsError(f"evaluate.methods.{method.name}: kind {method.kind} has no multi-stage form; "
                                        "leave it out with evaluate.stages=multi")
            if settings.finetune_model_path is None or settings.finetune_data_path is None:
                raise SettingsError("evaluate.stages=multi needs evaluate.finetune_model_path and evaluate.finetune_data_path")
        for pair in compare:
            if len(pair) != 2 or not set(pair) <= names:
                raise SettingsError(f"evaluate.compare entry {list(pair)} must name two of the methods: {', '.join(sorted(names))}")
        for method in methods:
            if method.kind == "lissa" and method.max_iterations is None:
                reference = next((m for m in methods if m.name == method.equal_time_to), None)
                if reference is None or reference.kind == "lissa":
                    raise SettingsError(f"method {method.name}: equal_time_to={method.equal_time_to!r} is not a non-LiSSA method")
        return settings
