"""Typed settings of the counterfactual validation; each mirrors a section of conf/validate_counterfactual.yaml.

Built once, by :meth:`CounterfactualSettings.from_config`, when the job starts: every mistake is
one :class:`~attribution.settings.SettingsError` line naming ``section.key`` and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from attribution.curvature.strategies import STRATEGIES
from attribution.settings import Check, PrefilterSettings, RefineSettings, SettingsError, from_mapping, show

# A factor strategy scored by the engine, or BM25 (retrieval scores, no model gradient).
METHOD_KINDS = (*STRATEGIES, "bm25")
# Whose gradients a method uses when the benchmark has a fine-tuning stage (``finetune_stage=true``):
# the pretrained model's (query and documents), the fine-tuned model's (single-stage on it), or
# multi-stage (query from the fine-tuned model through both stages' inverses, documents from the
# pretrained one).
STAGES = ("pretrained", "finetuned", "multi")
RETRAIN_BATCHES = ("corpus", "subset")


@dataclass(frozen=True)
class LdsSettings:
    """Linear datamodeling score: ``subsets`` random subsets of ``fraction`` of the corpus (drawn with
    ``seed``), each retrained with training seeds ``0 .. seeds-1``; the confidence interval over
    queries is a percentile bootstrap with ``bootstrap`` resamples at level ``confidence``."""

    fraction: float = 0.5
    subsets: int = 32
    seeds: int = 1
    seed: int = 0
    confidence: float = 0.95
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        check = Check("lds", self)
        check.number("fraction", 0.0, 1.0)
        if not 0.0 < self.fraction < 1.0:
            check.fail("fraction", "a number strictly between 0 and 1 (the share of the corpus each subset keeps)")
        check.integer("subsets", 3)
        check.integer("seeds", 1)
        check.integer("seed", 0)
        check.number("confidence", 0.0, 1.0)
        if not 0.0 < self.confidence < 1.0:
            check.fail("confidence", "a number strictly between 0 and 1")
        check.integer("bootstrap", 100)


@dataclass(frozen=True)
class RemovalSettings:
    """Top-k removal (:mod:`attribution.counterfactual.removal`): for each of the first ``queries``
    queries (0 = off) and each ranking, retrain without the ``fraction`` of the corpus it scores highest,
    with training seeds ``0 .. seeds-1``. The rankings are the headline scores of ``methods`` (null =
    every method) and, with ``random``, a random draw per query (seeded with ``seed``, which also seeds
    the bootstrap over queries; its level and resamples are the LDS's)."""

    fraction: float = 0.01
    queries: int = 8
    seeds: int = 1
    methods: tuple[str, ...] | None = None
    random: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("removal", self)
        check.number("fraction", 0.0, 1.0)
        if not 0.0 < self.fraction < 1.0:
            check.fail("fraction", "a number strictly between 0 and 1 (the share of the corpus removed per query)")
        check.integer("queries", 0)
        check.integer("seeds", 1)
        check.integer("seed", 0)
        if not isinstance(self.random, bool):
            check.fail("random", "true or false")

    @property
    def enabled(self) -> bool:
        return self.queries > 0


@dataclass(frozen=True)
class PbrfSettings:
    """The proximal Bregman response of ``documents`` up-weighted documents (half of them true sources of
    the first queries that have ``source_ids``, the rest drawn with ``seed``) on the first ``queries``
    queries (null = all): pairs = documents x queries. ``epsilon``: the up-weight (null = 1/N, one
    document of the N-sequence fit sample); ``steps``: L-BFGS iterations per document, stopping early
    once the gradient is ``tolerance`` times its starting size. ``documents: 0`` turns it off."""

    documents: int = 4
    queries: int | None = None
    epsilon: float | None = None
    steps: int = 100
    tolerance: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        check = Check("pbrf", self)
        check.integer("documents", 0)
        check.integer("queries", 1, none="every query")
        check.number("epsilon", positive=True, none="1 / the fit sample's sequences")
        check.integer("steps", 1)
        check.number("tolerance", 0.0, 1.0, positive=True)
        check.integer("seed", 0)

    @property
    def enabled(self) -> bool:
        return self.documents > 0


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: ``kind`` a factor strategy (``identity`` = the gradient dot product) or
    ``bm25``; ``refine`` the engine's query-side refinement (``refine.*`` keys; sample = the fit sample);
    ``prefilter`` the engine's retrieval first (``prefilter.*`` keys): only each query's ``top_m``
    candidates are scored, the pipeline's shape. ``stage`` (one of :data:`STAGES`) and, for a multi-stage
    method, ``finetune_damping`` (the fine-tuned stage's, as a multiple of that stage's own mean
    eigenvalue; null: the same multiple as the pretrained stage's) apply with ``finetune_stage=true``.
    ``normalize``: the engine's ``score.normalize``, every score divided by its document's gradient norm,
    ``I(q, z) / ||grad log p(z)||`` (with ``identity``, the cosine of the two gradients up to a per-query
    constant, which no ranking sees)."""

    name: str
    kind: str
    refine: RefineSettings = RefineSettings()
    prefilter: PrefilterSettings = PrefilterSettings()
    stage: str = "pretrained"
    finetune_damping: float | None = None
    normalize: bool = False

    @property
    def damped(self) -> bool:
        """Whether the method has a damping (the gradient dot product and BM25 have none)."""
        return self.kind not in ("identity", "bm25")


@dataclass(frozen=True)
class DampingSettings:
    """The dampings every damped method uses: ``values[0]`` is the headline (the methods table and the
    PBRF), the rest are rows for the ``methods`` listed. A number is a multiple of the mean eigenvalue
    of G over all modules (``trace / P`` of the EK-FAC fit) when ``relative``, else absolute; null is
    the engine's default, 0.1 x each module's own mean eigenvalue."""

    values: tuple[float | None, ...] = (10.0, 1.0, 100.0, None)
    relative: bool = True
    methods: tuple[str, ...] = ("ekfac", "kfac")

    def __post_init__(self) -> None:
        if not self.values:
            raise SettingsError("damping.values=[]: expected at least one damping (the first is the headline)")
        for value in self.values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SettingsError(f"damping.values={[show(v) for v in self.values]}: expected positive numbers or null "
                                    "(the engine's default per module)")
        if not isinstance(self.relative, bool):
            raise SettingsError(f"damping.relative={show(self.relative)}: expected true or false")


@dataclass(frozen=True)
class StepsSettings:
    """Rows of ``method`` (a refined method) at each step budget of ``values``, at the headline damping."""

    method: str | None = "refined_cg"
    values: tuple[int, ...] = (2, 5, 10)

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.values):
            raise SettingsError(f"refine_steps.values={list(self.values)}: expected positive step counts")


@dataclass(frozen=True)
class CounterfactualSettings:
    """What is validated: the factor fit, the refinement sample and the PBRF's Bregman term all use the
    first ``fit_sequences`` corpus documents, so every method and the PBRF share one G."""

    fit_sequences: int = 64
    progress: bool = True
    lds: LdsSettings = LdsSettings()
    removal: RemovalSettings = RemovalSettings()
    pbrf: PbrfSettings = PbrfSettings()
    damping: DampingSettings = DampingSettings()
    refine_steps: StepsSettings = StepsSettings()
    methods: tuple[MethodSpec, ...] = field(default_factory=tuple)
    # Fine-tune every retrained model with the benchmark's fine-tuning recipe and measure the fine-tuning
    # queries on it: the counterfactual of multi-stage attribution.
    finetune_stage: bool = False
    # How a retrained subset is cut into batches: subset (its own shuffle) or corpus (the whole corpus's
    # batches less the documents left out; attribution.counterfactual.retrain).
    retrain_batches: str = "corpus"

    def __post_init__(self) -> None:
        if isinstance(self.fit_sequences, bool) or not isinstance(self.fit_sequences, int) or self.fit_sequences < 1:
            raise SettingsError(f"fit_sequences={show(self.fit_sequences)}: expected a positive integer")
        if self.retrain_batches not in RETRAIN_BATCHES:
            raise SettingsError(f"retrain_batches={show(self.retrain_batches)}: expected one of {', '.join(RETRAIN_BATCHES)}")
        for key in ("progress", "finetune_stage"):
            if not isinstance(getattr(self, key), bool):
                raise SettingsError(f"{key}={show(getattr(self, key))}: expected true or false")

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> CounterfactualSettings:
        """From the job's sections (plain mappings): ``fit_sequences``, ``progress``, ``lds``, ``removal``, ``pbrf``,
        ``damping``, ``refine_steps`` and ``methods``."""
        values = dict(values)
        lds = from_mapping(LdsSettings, values.pop("lds", None) or {}, "lds")
        removal = dict(values.pop("removal", None) or {})
        if removal.get("methods") is not None:
            removal["methods"] = tuple(removal["methods"])
        removal_settings = from_mapping(RemovalSettings, removal, "removal")
        pbrf = from_mapping(PbrfSettings, values.pop("pbrf", None) or {}, "pbrf")
        damping = dict(values.pop("damping", None) or {})
        for key in ("values", "methods"):
            if key in damping:
                damping[key] = tuple(damping[key] or ())
        steps = dict(values.pop("refine_steps", None) or {})
        if "values" in steps:
            steps["values"] = tuple(steps["values"] or ())
        methods = tuple(_method(name, spec) for name, spec in (values.pop("methods", None) or {}).items())
        settings = from_mapping(cls, {**values, "lds": lds, "removal": removal_settings, "pbrf": pbrf,
                                      "damping": from_mapping(DampingSettings, damping, "damping"),
                                      "refine_steps": from_mapping(StepsSettings, steps, "refine_steps"), "methods": methods},
                                "validate_counterfactual")
        settings.check_references()
        return settings

    def check_references(self) -> None:
        """Every method the sweeps name exists, and can be swept."""
        if not self.methods:
            raise SettingsError("methods is empty: nothing to validate")
        names = {m.name: m for m in self.methods}
        staged = [m.name for m in self.methods if m.stage != "pretrained"]
        if staged and not self.finetune_stage:
            raise SettingsError(f"methods.{staged[0]}.stage={names[staged[0]].stage}: only a benchmark with a fine-tuning "
                                "stage has a fine-tuned model; set finetune_stage=true")
        for name in self.removal.methods or ():
            if name not in names:
                raise SettingsError(f"removal.methods: {name} is not one of the methods ({', '.join(names)})")
        for name in self.damping.methods:
            if name not in names:
                raise SettingsError(f"damping.methods: {name} is not one of the methods ({', '.join(names)})")
            if not names[name].damped:
                raise SettingsError(f"damping.methods: {name} ({names[name].kind}) has no damping to sweep")
        method = self.refine_steps.method
        if method is not None and self.refine_steps.values:
            if method not in names:
                raise SettingsError(f"refine_steps.method={method} is not one of the methods ({', '.join(names)})")
            if not names[method].refine.enabled:
                raise SettingsError(f"refine_steps.method={method} is not refined (set its refine.method to cg or stochastic)")

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)


def _method(name: str, spec: Mapping[str, Any] | None) -> MethodSpec:
    spec = dict(spec or {})
    group = f"methods.{name}"
    known = ("kind", "refine", "prefilter", "stage", "finetune_damping", "normalize")
    unknown = set(spec) - set(known)
    if unknown:
        raise SettingsError(f"unknown key(s) in {group}: {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    kind = spec.get("kind")
    if kind not in METHOD_KINDS:
        raise SettingsError(f"{group}.kind={show(kind)}: expected one of {', '.join(METHOD_KINDS)}")
    refine = _section(RefineSettings, spec, "refine", group).resolved("identity" if kind == "bm25" else kind, sharded=False)
    prefilter = _section(PrefilterSettings, spec, "prefilter", group)
    if refine.enabled and kind not in ("ekfac", "kfac", "diagonal"):
        raise SettingsError(f"{group}.refine.method={refine.method}: only a fitted strategy (ekfac, kfac, diagonal) is refined")
    if prefilter.kind != "none" and kind == "bm25":
        raise SettingsError(f"{group}.prefilter.kind={prefilter.kind}: bm25 scores every document itself; "
                            "a prefilter goes before an influence method")
    if prefilter.kind == "gradient" and kind not in ("ekfac", "kfac", "diagonal"):
        raise SettingsError(f"{group}.prefilter.kind=gradient: the sketches are whitened by the method's own factor "
                            "store, so only a fitted strategy (ekfac, kfac, diagonal) takes them")
    if prefilter.path is not None:
        raise SettingsError(f"{group}.prefilter.path={prefilter.path}: the job keeps its own indexes, under "
                            "<output_dir>/engine/prefilter")
    stage = spec.get("stage", "pretrained")
    if stage not in STAGES:
        raise SettingsError(f"{group}.stage={show(stage)}: expected one of {', '.join(STAGES)}")
    if stage != "pretrained" and kind == "bm25":
        raise SettingsError(f"{group}.stage={stage}: bm25 uses no model, so it has no stage")
    if stage == "multi" and kind not in ("ekfac", "kfac", "diagonal"):
        raise SettingsError(f"{group}.stage=multi: both stages are preconditioned by fitted stores, so only a fitted "
                            "strategy (ekfac, kfac, diagonal) takes it")
    if stage == "multi" and prefilter.kind == "gradient":
        raise SettingsError(f"{group}.prefilter.kind=gradient: multi-stage queries are not sketched; use bm25, tfidf or dense")
    finetune_damping = spec.get("finetune_damping")
    if finetune_damping is not None and stage != "multi":
        raise SettingsError(f"{group}.finetune_damping={show(finetune_damping)}: only a multi-stage method has a "
                            "fine-tuned stage to damp")
    if finetune_damping is not None and (isinstance(finetune_damping, bool) or not isinstance(finetune_damping, (int, float))
                                         or finetune_damping <= 0):
        raise SettingsError(f"{group}.finetune_damping={show(finetune_damping)}: expected a positive multiple of the "
                            "fine-tuned stage's mean eigenvalue, or null")
    normalize = spec.get("normalize", False)
    if not isinstance(normalize, bool):
        raise SettingsError(f"{group}.normalize={show(normalize)}: expected true or false")
    if normalize and kind == "bm25":
        raise SettingsError(f"{group}.normalize=true: bm25 has no gradient to normalise by")
    return MethodSpec(name, kind, refine, prefilter, stage, finetune_damping, normalize)


def _section(kind: type, spec: Mapping[str, Any], key: str, group: str) -> Any:
    """``spec[key]`` as the settings class ``kind``, its errors named ``methods.NAME.key...``."""
    try:
        return from_mapping(kind, spec.get(key) or {}, f"{group}.{key}")
    except SettingsError as error:
        message = str(error)
        raise SettingsError(message if message.startswith(group) else f"{group}.{message}") from error


def with_steps(spec: MethodSpec, steps: int) -> MethodSpec:
    """``spec`` refined with at most ``steps`` Gauss-Newton products per query."""
    return replace(spec, name=f"{spec.name}@{steps}", refine=replace(spec.refine, steps=steps))

