"""Study files: a YAML that declares a set of training runs (trials) and how to lay out their table.

A study file is validated completely before anything runs: the study's own fields (pydantic,
unknown fields refused) and the ExperimentConfig of every trial it expands to, so a misspelled key in
one variant is reported, with the file and the dotted key, before Ray starts.

```yaml
name: table3                       # MLflow experiment (default) and the study's identity
description: ...
base:                              # the config every trial starts from
  file: base/paper_cuhk03.yaml     # an ExperimentConfig YAML, relative to this study file (optional)
  overrides: {stage2.w_ro: 0.0}    # dotted overrides on top of it (optional)
variants:                          # named rows: label -> dotted overrides (optional)
  ResNet50+TSAM+MFA: {model.attention: tsam, model.side: mfa}
axes:                              # a grid over dotted keys, crossed with the variants (optional)
  stage2.loss: [independent, uniform, cascade]
rules:                             # conditional overrides applied after variants and axes (optional)
  - when: {data.dataset: msmt17}
    set: {stage2.temperatures: [5, 4, 3]}
repeats: 1                         # seeds 0..N-1, or {seeds: [0, 7]} -> runtime.seed
search: ...                        # Optuna via Ray Tune (optional), see SearchSpec
resources: {cpu: 4, gpu: 0.5}      # per trial; fractions allowed
metric: rank1
mode: max
tracking: {uri: ..., experiment: ...}
storage: ./ray_results
report: {title: ..., rows: variant, columns: [], values: [rank1, mAP], paper: table3, plot: none}
```
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pfe.config import ExperimentConfig, describe_validation_error, flatten, load_config, read_yaml
from pfe.errors import ConfigError
from pfe.study.uris import absolute_sqlite_uri, default_tracking_uri, mask_uri

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _dotted(value: dict[str, Any]) -> dict[str, Any]:
    """Overrides may be written nested (``model: {side: mfa}``): flatten them to dotted keys."""
    return flatten(value) if isinstance(value, dict) else value


class BaseConfigSpec(_Strict):
    """Where every trial's config starts: a config file and/or inline dotted overrides."""

    file: str | None = Field(None, description="ExperimentConfig YAML, relative to the study file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")

    @field_validator("overrides")
    @classmethod
    def _flat(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _dotted(value)


class Rule(_Strict):
    """Overrides applied to the trials whose config matches ``when`` (e.g. MSMT17's temperatures)."""

    when: dict[str, Any]
    set: dict[str, Any]

    @field_validator("when", "set")
    @classmethod
    def _not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("must name at least one dotted key")
        return _dotted(value)


class RepeatsSpec(_Strict):
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value


class Distribution(_Strict):
    """One search dimension: uniform | loguniform | int | logint | choice | quniform."""

    type: Literal["uniform", "loguniform", "int", "logint", "choice", "quniform"]
    low: float | None = None
    high: float | None = None
    q: float | None = Field(None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes `values`, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"a {self.type} distribution takes low/high, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs `low` and `high`")
        if self.high <= self.low:
            raise ValueError("`high` must be greater than `low`")
        if self.type in ("loguniform", "logint") and self.low <= 0:
            raise ValueError("a log distribution needs low > 0")
        if self.type == "quniform" and self.q is None:
            raise ValueError("quniform needs `q`")
        if self.type in ("int", "logint") and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int distribution needs integer low/high")
        return self

    def probe_values(self) -> list[Any]:
        """Values that exercise the config validation (bounds, every choice)."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type in ("int", "logint"):
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]

    def to_optuna(self) -> Any:
        """The matching optuna distribution (imported here: optuna is optional for pfe.study.spec)."""
        import optuna.distributions as od

        if self.type == "uniform":
            return od.FloatDistribution(self.low, self.high)
        if self.type == "loguniform":
            return od.FloatDistribution(self.low, self.high, log=True)
        if self.type == "quniform":
            return od.FloatDistribution(self.low, self.high, step=self.q)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), step=int(self.q or 1))  # type: ignore[arg-type]
        if self.type == "logint":
            return od.IntDistribution(int(self.low), int(self.high), log=True)  # type: ignore[arg-type]
        return od.CategoricalDistribution(self.values)

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice{self.values}"
        extra = f", q={self.q}" if self.q else ""
        return f"{self.type}({self.low}, {self.high}{extra})"


class SchedulerSpec(_Strict):
    """Early stopping with ASHA; time is counted in epochs of the trial."""

    type: Literal["asha"] = "asha"
    max_t: int | None = Field(None, ge=1, description="epochs; default: the trial's epochs")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)


class SearchSpec(_Strict):
    """Optuna through Ray Tune's OptunaSearch."""

    space: dict[str, Distribution] = Field(min_length=1)
    num_samples: int = Field(ge=1)
    sampler: Literal["tpe", "random", "cmaes", "qmc"] = "tpe"
    seed: int | None = Field(0, description="sampler seed (None: random)")
    scheduler: SchedulerSpec | None = None


class Resources(_Strict):
    """CPUs and GPUs of one Tune trial. Fractions of a GPU are allowed (several trials share one GPU)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _gpu_fraction(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU must be a whole number")
        return value


class ResourcesSpec(Resources):
    """Per trial; ``stage1`` optionally gives the shared stage-I runs their own (they train the whole
    backbone, and the stage-II trials that reuse them wait for them)."""

    stage1: Resources | None = None

    def for_role(self, role: str) -> Resources:
        """``stage1`` runs get ``stage1`` (when set); every other trial gets cpu/gpu."""
        if role == "stage1" and self.stage1 is not None:
            return self.stage1
        return Resources(cpu=self.cpu, gpu=self.gpu)


class TrackingSpec(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<cwd>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment; default: the study name")


class SynthSpec(_Strict):
    """How to generate a missing synthreid folder (pfe.data.synth.generate_synthreid)."""

    ids_train: int | None = Field(None, ge=2, description="default: the generator's")
    ids_test: int | None = Field(None, ge=2)
    images_per_id: int | None = Field(None, ge=4)
    cameras: int | None = Field(None, ge=2, le=9)
    seed: int = 0


class ReportLayout(_Strict):
    """How `pfe-study report` lays out this study's table (and plot)."""

    title: str = ""
    rows: str = Field("variant", description='"variant" (the named variants) or a dotted axis key')
    columns: list[str] = Field(default_factory=list, description="dotted axis keys to pivot on")
    values: list[str] = Field(default_factory=lambda: ["rank1", "mAP"], min_length=1)
    paper: str | None = Field(None, description="key into reports/paper_reference.yaml")
    plot: Literal["none", "line", "layers"] = "none"


class StudySpec(_Strict):
    """A validated study file. ``source`` is the file it came from (set by load_study)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    base: BaseConfigSpec = Field(default_factory=BaseConfigSpec)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    repeats: int | RepeatsSpec = 1
    search: SearchSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    metric: str = "rank1"
    mode: Literal["max", "min"] = "max"
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: str | None = Field(None, description="Ray Tune storage path; default ./ray_results")
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0, description="retries of a failed trial from its last checkpoint")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop the Tune run after this long; unfinished trials are recorded incomplete"
    )
    synthetic: SynthSpec | None = Field(None, description="generate a missing synthreid data.root")
    report: ReportLayout = Field(default_factory=ReportLayout)

    source: str = Field("<study>", exclude=True)
    base_config: ExperimentConfig | None = Field(None, exclude=True)

    @field_validator("repeats")
    @classmethod
    def _positive(cls, value: int | RepeatsSpec) -> int | RepeatsSpec:
        if isinstance(value, int) and value < 1:
            raise ValueError("repeats must be >= 1")
        return value

    @field_validator("variants")
    @classmethod
    def _flat_variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {label: _dotted(over) for label, over in value.items()}

    @field_validator("axes")
    @classmethod
    def _axes_non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return value

    # ---- derived ------------------------------------------------------------------------------
    @property
    def seeds(self) -> list[int]:
        return list(range(self.repeats)) if isinstance(self.repeats, int) else list(self.repeats.seeds)

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def tracking_uri(self) -> str:
        """The study's URI, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
        return self.tracking.uri or default_tracking_uri()

    @property
    def storage_path(self) -> str:
        """The study's storage, else $PFE_STORAGE, else ``./ray_results`` (absolute)."""
        return self.storage or os.environ.get("PFE_STORAGE") or str(Path("ray_results").resolve())

    def base_cfg(self) -> ExperimentConfig:
        if self.base_config is None:
            raise ConfigError(f"{self.source}: study not loaded with load_study")
        return self.base_config

    def expand(self) -> list[Trial]:
        """Every trial: variants x axes grid x seeds (for a search: the template trials)."""
        trials = list(_expand(self))
        seen: dict[str, Trial] = {}
        for trial in trials:
            if trial.trial_id in seen:
                other = seen[trial.trial_id]
                raise ConfigError(
                    f"{self.source}: trials {other.label!r} and {trial.label!r} (seed {trial.seed}) define the same "
                    "experiment; remove one of them"
                )
            seen[trial.trial_id] = trial
        return trials

    def stage1_groups(self) -> dict[str, list[Trial]]:
        """stage1_key -> the trials that share that stage-I run (insertion ordered)."""
        groups: dict[str, list[Trial]] = {}
        for trial in self.expand():
            groups.setdefault(trial.stage1_key, []).append(trial)
        return groups

    def search_touches_stage1(self) -> bool:
        """True when a searched key changes the stage-I run (then each sample trains its own stage I)."""
        if not self.search:
            return False
        base = self.expand()[0].cfg
        for key, dist in self.search.space.items():
            for value in dist.probe_values():
                if base.with_overrides({key: value}).stage1_key() != base.stage1_key():
                    return True
        return False


@dataclass(frozen=True)
class Trial:
    """One training run of a study: a variant (row label) x axis values x seed."""

    variant: str
    axes: dict[str, Any]
    seed: int
    cfg: ExperimentConfig
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [self.variant] if self.variant else []
        parts += [f"{k}={_show(v)}" for k, v in self.axes.items()]
        return ", ".join(parts) or "base"

    @property
    def stage1_key(self) -> str:
        return self.cfg.stage1_key()

    @property
    def trial_id(self) -> str:
        """Stable identity: the hash of the experiment-defining config."""
        return self.cfg.config_hash()

    @property
    def has_stage2(self) -> bool:
        return self.cfg.model.side != "none" and self.cfg.stage2.epochs > 0


def stage1_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config of the shared stage-I run: same stage-I key, no side branches, no stage II."""
    out = cfg.with_overrides({"model.side": "none", "stage2.epochs": 0}, source="<stage1>")
    assert out.stage1_key() == cfg.stage1_key()
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _expand(spec: StudySpec) -> Iterator[Trial]:
    base = spec.base_cfg()
    variants = spec.variants or {"": {}}
    axis_keys = list(spec.axes)
    for label, var_over in variants.items():
        for combo in itertools.product(*(spec.axes[k] for k in axis_keys)):
            axis_values = dict(zip(axis_keys, combo))
            for seed in spec.seeds:
                yield _make_trial(spec, base, label, var_over, axis_values, seed)


def _make_trial(
    spec: StudySpec,
    base: ExperimentConfig,
    label: str,
    var_over: dict[str, Any],
    axis_values: dict[str, Any],
    seed: int,
) -> Trial:
    overrides: dict[str, Any] = {**var_over, **axis_values}
    cfg = _apply(base, var_over, f"{spec.source}: variants.{label}")
    shown = ", ".join(f"{k}={_show(v)}" for k, v in axis_values.items())
    cfg = _apply(cfg, axis_values, f"{spec.source}: axes ({shown})" + (f" in variants.{label}" if label else ""))
    flat = cfg.flat()
    for i, rule in enumerate(spec.rules):
        if all(_matches(flat.get(k), v) for k, v in rule.when.items()):
            overrides.update(rule.set)
            cfg = _apply(cfg, rule.set, f"{spec.source}: rules[{i}].set")
            flat = cfg.flat()
    overrides["runtime.seed"] = seed
    cfg = _apply(cfg, {"runtime.seed": seed}, f"{spec.source}: repeats")
    root = cfg.data.root
    if root and "://" not in root and not Path(root).is_absolute():
        # relative data roots are relative to the working directory; Tune trials run elsewhere
        cfg = cfg.with_overrides({"data.root": str(Path(root).resolve())})
    return Trial(variant=label, axes=axis_values, seed=seed, cfg=cfg, overrides=overrides)


def _matches(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, list) and not isinstance(actual, list):
        return actual in wanted  # `when: {data.dataset: [msmt17, cuhk03np]}` means "any of"
    return actual == wanted


def _apply(cfg: ExperimentConfig, overrides: dict[str, Any], where: str) -> ExperimentConfig:
    if not overrides:
        return cfg
    try:
        return cfg.with_overrides(overrides, source=where)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


# ---- loading ----------------------------------------------------------------------------------
def load_study(path: str | Path) -> StudySpec:
    """Read and fully validate a study file (raises ConfigError naming the file and dotted key)."""
    path = Path(path)
    source = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study file must be a mapping of fields (name, base, variants, ...)")
    for reserved in ("source", "base_config"):
        if reserved in data:
            raise ConfigError(f"{source}: {reserved}: unknown study field")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(
            err, source, "study file", "unknown study field (see pfe/study/spec.py for the schema)"
        )) from None
    spec.source = source
    spec.base_config = _load_base(spec, path)
    _resolve_paths(spec)
    _check_keys(spec)
    trials = spec.expand()  # validates every trial's config
    if spec.search:
        _check_search(spec, trials)
    return spec


def _load_base(spec: StudySpec, path: Path) -> ExperimentConfig:
    base_file = None
    if spec.base.file:
        base_file = Path(spec.base.file)
        if not base_file.is_absolute():
            base_file = path.parent / base_file
        if not base_file.is_file():
            raise ConfigError(
                f"{spec.source}: base.file: {base_file} is not a file (paths are relative to the study file)"
            )
    try:
        cfg = load_config(base_file) if base_file else ExperimentConfig()
    except ConfigError as err:
        raise ConfigError(f"{spec.source}: base.file: {err}") from None
    return _apply(cfg, spec.base.overrides, f"{spec.source}: base.overrides")


def _resolve_paths(spec: StudySpec) -> None:
    """Make the tracking URI and storage absolute: Tune changes a trial's working directory."""
    if spec.tracking.uri:
        spec.tracking.uri = absolute_sqlite_uri(spec.tracking.uri)
    else:
        spec.tracking.uri = absolute_sqlite_uri(spec.tracking_uri)
    if not spec.storage:
        spec.storage = spec.storage_path
    if "://" not in spec.storage:
        spec.storage = str(Path(os.path.expanduser(spec.storage)).resolve())


def _known_keys(spec: StudySpec) -> set[str]:
    return set(spec.base_cfg().flat())


def _check_key(spec: StudySpec, key: str, where: str) -> None:
    known = _known_keys(spec)
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{spec.source}: {where}: {key}: unknown config key{hint}")


def _check_keys(spec: StudySpec) -> None:
    for key in spec.axes:
        _check_key(spec, key, "axes")
        if key == "runtime.seed":
            raise ConfigError(f"{spec.source}: axes: runtime.seed: use `repeats` for seeds")
    for label, overrides in spec.variants.items():
        for key in overrides:
            _check_key(spec, key, f"variants.{label}")
            if key in spec.axes:
                raise ConfigError(f"{spec.source}: variants.{label}: {key}: also an axis; set it in one place only")
            if key == "runtime.seed":
                raise ConfigError(f"{spec.source}: variants.{label}: runtime.seed: use `repeats` for seeds")
    for i, rule in enumerate(spec.rules):
        for key in rule.when:
            _check_key(spec, key, f"rules[{i}].when")
        for key in rule.set:
            _check_key(spec, key, f"rules[{i}].set")
    axis_like = {"variant", *spec.axes, *(spec.search.space if spec.search else {})}
    for key in [spec.report.rows, *spec.report.columns]:
        if key not in axis_like:
            raise ConfigError(
                f"{spec.source}: report: {key}: rows/columns must be 'variant' or an axis key "
                f"({', '.join(sorted(axis_like))})"
            )
    if spec.report.rows in spec.report.columns:
        raise ConfigError(f"{spec.source}: report.columns: {spec.report.rows} is already the rows")
    if spec.report.plot == "line" and not spec.axes:
        raise ConfigError(f"{spec.source}: report.plot: a line plot needs an axis for x")


def _check_search(spec: StudySpec, trials: list[Trial]) -> None:
    assert spec.search is not None
    for key, dist in spec.search.space.items():
        _check_key(spec, key, "search.space")
        if key in spec.axes or any(key in v for v in spec.variants.values()) or key == "runtime.seed":
            raise ConfigError(f"{spec.source}: search.space: {key}: also set by an axis, variant or repeats")
        for value in dist.probe_values():
            for trial in trials:
                _apply(trial.cfg, {key: value}, f"{spec.source}: search.space.{key}={value!r}")
    sched = spec.search.scheduler
    if sched and sched.max_t and sched.grace_period > sched.max_t:
        raise ConfigError(f"{spec.source}: search.scheduler.grace_period: larger than max_t")


# ---- dry-run table ----------------------------------------------------------------------------
def format_plan(spec: StudySpec) -> str:
    """The trial table and the stage-I groups, as printed by `pfe-study run --dry-run`."""
    trials = spec.expand()
    groups = spec.stage1_groups()
    base_flat = spec.base_cfg().flat()
    lines = [f"study {spec.name} ({spec.source})"]
    if spec.description:
        lines += textwrap.wrap(spec.description, 100, initial_indent="  ", subsequent_indent="  ")
    lines.append(f"tracking {mask_uri(spec.tracking_uri)} experiment {spec.experiment!r}; storage {spec.storage_path}")
    res = spec.resources
    shown = f"cpu {res.cpu:g}, gpu {res.gpu:g}"
    if res.stage1 is not None:
        shown += f" (stage-I runs: cpu {res.stage1.cpu:g}, gpu {res.stage1.gpu:g})"
    lines.append(f"resources per trial: {shown}; metric {spec.metric} ({spec.mode})")
    lines.append("")
    header = ("#", "trial_id", "variant", "seed", "stage1", "stage II", "overrides")
    rows = []
    for i, trial in enumerate(trials):
        shown = {
            k: v for k, v in trial.overrides.items() if k != "runtime.seed" and base_flat.get(k) != v or k in trial.axes
        }
        stage2 = f"{trial.cfg.stage2.epochs} ep" if trial.has_stage2 else "-"
        rows.append(
            (
                str(i + 1),
                trial.trial_id[:10],
                trial.variant or "-",
                str(trial.seed),
                trial.stage1_key[:10],
                stage2,
                " ".join(f"{k}={_show(v)}" for k, v in shown.items()) or "-",
            )
        )
    lines += _table(header, rows)
    lines.append("")
    lines.append(f"stage-I groups ({len(groups)}: distinct stage-I configs x seeds; each trained once):")
    for key, members in groups.items():
        cfg = members[0].cfg
        lines.append(
            f"  {key[:10]}  seed {cfg.runtime.seed}  {cfg.data.dataset} {cfg.model.backbone} "
            f"attention={cfg.model.attention}  {cfg.stage1.epochs} ep  shared by {len(members)}: "
            + " | ".join(m.label for m in members)
        )
    n_stage2 = sum(t.has_stage2 for t in trials)
    lines.append("")
    if spec.search:
        s = spec.search
        lines.append(
            f"search: {s.num_samples} samples, Optuna {s.sampler} sampler (seed {s.seed}), "
            + (
                f"ASHA (grace {s.scheduler.grace_period}, factor {s.scheduler.reduction_factor:g})"
                if s.scheduler
                else "no scheduler"
            )
        )
        for key, dist in s.space.items():
            lines.append(f"  {key}: {dist.describe()}")
        if spec.search_touches_stage1():
            lines.append(
                f"total: {len(trials) * s.num_samples} trials, each training its own stage I (a searched key changes it)"
            )
        else:
            lines.append(f"total: {len(trials) * s.num_samples} trials (shared stage I), {len(groups)} stage-I runs")
    else:
        lines.append(f"total: {len(trials)} trials ({n_stage2} with a stage II), {len(groups)} stage-I runs")
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [
        fmt.format(*header).rstrip(),
        fmt.format(*("-" * w for w in widths)),
        *(fmt.format(*r).rstrip() for r in rows),
    ]
