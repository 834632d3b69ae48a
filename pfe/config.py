"""ExperimentConfig: one typed, validated config for one training run.

Defaults are the paper's recipe (Sec. V-B) and the readings of ../shared/DESIGN.md.
Keys are addressed everywhere as dotted paths (``model.side``, ``stage2.w_ro``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pfe.errors import ConfigError

Dataset = Literal["market1501", "dukemtmcreid", "msmt17", "cuhk03np", "synthreid"]
Backbone = Literal["resnet18", "resnet50", "resnet101", "resnext101_32x8d", "densenet169"]
Attention = Literal["none", "seb", "fab", "tsam"]
Side = Literal["none", "side", "fa", "mfa"]
SideLoss = Literal["independent", "uniform", "cascade"]
Cuhk03Split = Literal["detected", "labeled"]

LAYERS = ("F2", "F3", "F4", "F5")
DEFAULT_EVAL_SETS = ("F2", "F3", "F4", "F5", "F4_F5", "F3_F4_F5", "F2_F3_F4_F5")
FINAL_SET = "F2_F3_F4_F5"
RANK_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
HEADLINE_METRICS = ("rank1", "mAP", "mINP")  # a run's own rank1 / mAP / mINP: those of its final feature set


def with_headline(metrics: dict[str, float], final_set: str) -> dict[str, float]:
    """``metrics`` plus rank1, mAP and mINP copied from ``eval/<final_set>/...`` where that set was evaluated."""
    found = {m: metrics[f"eval/{final_set}/{m}"] for m in HEADLINE_METRICS if f"eval/{final_set}/{m}" in metrics}
    return {**metrics, **found}


# data.workers=auto never starts more: past ~8 decoding workers a GPU step is no longer input-bound at
# 384x192 (about 400 images/s per worker on a 2-core CI machine), and each worker holds its prefetched batches.
MAX_AUTO_WORKERS = 8


def resolve_workers(setting: int | str, cpus: float | None = None) -> int:
    """DataLoader workers for ``data.workers``: a number as it is; ``auto``: one less than ``cpus`` (the
    main process needs one; default: the CPUs this process may run on), at most ``MAX_AUTO_WORKERS``."""
    if setting != "auto":
        return int(setting)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, int(cpus) - 1))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which dataset, how it is read, sampled and augmented."""

    dataset: Dataset = "market1501"
    root: str | None = Field(None, description="data root; default: $PFE_DATA, else ./data")
    cuhk03_split: Cuhk03Split = "detected"
    msmt_version: Literal["v1", "v2"] = "v2"
    # The paper trains MSMT17 on 32,621 images (Sec. V-A): the official train + val lists. torchreid and
    # fast-reid add val only with `combineall`; set False to match their 30,248-image default.
    msmt_train_includes_val: bool = True
    height: int = Field(384, ge=32, le=1024)
    width: int = Field(192, ge=16, le=1024)
    ids_per_batch: int = Field(8, ge=2, description="P of the PK sampler")
    images_per_id: int = Field(4, ge=2, description="K of the PK sampler")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    erasing_prob: float = Field(0.5, ge=0.0, le=1.0)
    pad: int = Field(0, ge=0, description="pad + random crop in pixels; 0 = off (the paper's recipe)")
    skip_corrupt: bool = False
    workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes (decoding, augmentation, evaluation); auto: one less "
        "than the CPUs this run may use (in a Ray trial, its `resources.cpu`), at most 8 (pfe.config."
        "resolve_workers)")

    @field_validator("workers")
    @classmethod
    def _workers_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("a number of worker processes is 0 or more, or auto")
        return value
    cache: Literal["none", "device"] = Field(
        "none",
        description="none: decode and augment each epoch in DataLoader workers; device: decode the training "
        "split once to uint8 on the training device and flip/crop/erase/normalise there (pfe.data.device_cache)",
    )

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.images_per_id


class ModelConfig(_Section):
    """PFENet: backbone, inline attention, side branches (Sec. IV)."""

    backbone: Backbone = "resnet50"
    last_stride: Literal[1, 2] = 1
    pretrained: str = Field("imagenet", description="imagenet | none | path to a state-dict file")
    attention: Attention = "tsam"
    reduction: int = Field(16, ge=1, description="r of SEB and FAB")
    side: Side = "mfa"
    # The paper does not state C; DESIGN.md reads C = 128 from Table V (25.66 M params, 10.23 GMACs, MFA-dagger
    # +3.18 %: inside every tolerance). C = 96 comes closer to the paper's numbers (25.47 M, 10.00, +2.35 %;
    # reports/table5_profile.md) and was the default before 2026-12: see HASHED_AT_DEFAULT.
    channels: int = Field(128, ge=8, description="shared width C of the T_s maps")
    side_dim: int = Field(512, ge=8, description="dimension of F2, F3, F4")
    separable: bool = Field(False, description="depthwise-separable 3x3 in CONV (the paper's MFA-dagger)")
    alpha: float = Field(0.05, ge=0.0, le=1.0, description="share of A_s positions masked (Eq. 12)")


class _Recipe(_Section):
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0.0)
    milestones: list[int]
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    weight_decay: float = Field(
        5e-4, ge=0.0, description="Adam's L2 term on every trained parameter, BN and classifiers too. The paper "
        "states none; 5e-4 is the value of the ReID bag of tricks (the paper's [23])")
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:])) or any(m < 1 for m in value):
            raise ValueError("milestones must be positive and strictly increasing")
        return value


class Stage1Config(_Recipe):
    """Stage I: main branch with CE on BN(F5) + batch-hard triplet on F5 (Eq. 6)."""

    epochs: int = Field(120, ge=1)
    lr: float = Field(3.5e-4, gt=0.0)
    milestones: list[int] = [40, 70]
    triplet_margin: float = Field(0.3, gt=0.0)


class Stage2Config(_Recipe):
    """Stage II: frozen main branch, side branches with Eq. (7) + w_ro * Eq. (8) (Eq. 9)."""

    epochs: int = Field(80, ge=0)
    lr: float = Field(3.5e-5, gt=0.0)
    milestones: list[int] = [30, 60]
    loss: SideLoss = "cascade"
    temperatures: list[float] = Field([10.0, 8.0, 6.0], description="t2, t3, t4 of Eq. (7)")
    w_ro: float = Field(0.001, ge=0.0, description="region overlap weight (Eq. 9)")

    @field_validator("temperatures")
    @classmethod
    def _three_positive(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(t <= 0 for t in value):
            raise ValueError("temperatures must be three positive numbers: t2, t3, t4")
        return value


class EvalConfig(_Section):
    """Evaluation during and after training."""

    interval: int = Field(0, ge=0, description="evaluate every N epochs; 0 = at the end of each stage only")
    sets: list[str] = list(DEFAULT_EVAL_SETS)
    flip: bool = Field(False, description="average features of the image and its mirror")
    max_rank: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=1)
    rerank: bool = Field(False, description="also report k-reciprocal re-ranked metrics")
    at_start: bool = Field(False, description="also evaluate the untrained model (epoch 0 of stage I)")

    @field_validator("sets")
    @classmethod
    def _known_layers(cls, value: list[str]) -> list[str]:
        for name in value:
            parts = name.split("_")
            if not parts or any(p not in LAYERS for p in parts) or len(set(parts)) != len(parts):
                raise ValueError(f"feature set {name!r}: use layer names {', '.join(LAYERS)} joined by '_'")
        return value


class RuntimeConfig(_Section):
    """How the run executes. Only seed, precision and deterministic change results."""

    seed: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU, fp32 on a CPU")
    deterministic: bool = False
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    output_dir: str = "runs"
    progress: bool = True
    nan_check_every: int = Field(50, ge=1, description="look at the accumulated NaN/Inf flag every N steps")
    compile: Literal["auto", "off", "regions", "all"] = Field(
        "auto", description="torch.compile (results equal up to rounding; each stage's first steps take "
        "longer): regions: the attention blocks and the side branches, whose memory-bound gates, masks, "
        "BN, ReLU and pooling Inductor fuses; all: also the backbone (its BN, ReLU and residual adds); "
        "auto: all when the step is replayed from a CUDA graph, else off (pfe.model.compile_mode). "
        "true / false read as all / off")
    autotune: Literal["off", "coordinate_descent", "max_autotune_gemm", "max_autotune"] = Field(
        "off", description="when runtime.compile compiles on a GPU, how long Inductor searches for faster kernels "
        "(compile time only; results equal up to rounding): coordinate_descent tunes the block sizes of its own "
        "Triton kernels; max_autotune_gemm also benchmarks Triton GEMM templates (the 1x1 convs), with the "
        "pointwise work that follows in their epilogues, against cuBLAS; max_autotune Triton conv templates too, "
        "against cuDNN (minutes more per stage). Ignored on a CPU")
    cuda_graph: bool = Field(
        True, description="on a CUDA device, replay each training step from a CUDA graph (the host need not "
        "launch its ~1,300 kernels one by one; pfe.engine.graphed); ignored on a CPU")
    frozen_main: Literal["auto", "modules", "folded", "fused"] = Field(
        "auto", description="how stage II runs the frozen main branch in training: the checkpointed modules, "
        "a copy with BN folded into the convs, or that copy with cuDNN conv+ReLU kernels (pfe.model.frozen; "
        "results equal up to rounding); auto: fused when the step is replayed from a CUDA graph, else folded")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("a device is auto, cpu, cuda or cuda:N")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """Configs written when runtime.compile was a switch: true is everything, false nothing."""
        if isinstance(value, bool):
            return "all" if value else "off"
        return value


# Keys that never change what a run computes (paths, hosts, devices, logging). They are not
# hashed and, in MLflow, they are tags rather than params: they may change when a run resumes.
ENVIRONMENT_KEYS = frozenset(
    {
        "data.root",
        "data.workers",
        "eval.batch_size",
        "runtime.device",
        "runtime.output_dir",
        "runtime.progress",
        "runtime.nan_check_every",
        "runtime.frozen_main",
        "runtime.compile",
        "runtime.autotune",
        "runtime.cuda_graph",
    }
)

# Keys whose default changed after runs were recorded under the old one (model.channels was 96 until
# 2026-12). They are hashed even at their default, so a trial run under the old default never
# resumes, in an existing MLflow store or run folder, as one of the new.
HASHED_AT_DEFAULT = frozenset({"model.channels"})

# What determines a stage-I run: data, input size, backbone, last stride, pretrained,
# attention, the stage-I recipe, precision, seed. Nothing of the side branches or stage II.
STAGE1_PREFIXES = (
    "data.",
    "model.backbone",
    "model.last_stride",
    "model.pretrained",
    "model.attention",
    "model.reduction",
    "stage1.",
    "runtime.seed",
    "runtime.precision",
    "runtime.deterministic",
)


class ExperimentConfig(_Section):
    """Everything that defines one training run (stage I + stage II)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _region_overlap_has_its_maps(self) -> ExperimentConfig:
        """Eq. (8) multiplies A_2..A_5; ``side`` has no T_5, so it has no A_5 (Tables II, III set w_ro = 0)."""
        if self.model.side == "side" and self.stage2.w_ro > 0:
            raise ValueError(
                f"stage2.w_ro={self.stage2.w_ro} with model.side=side: the region overlap loss (Eq. 8) needs A_5, "
                "which only fa and mfa have; set stage2.w_ro: 0 (as the paper does for +side) or model.side: fa | mfa"
            )
        return self

    # ---- flattening and hashing -------------------------------------------------------------
    def flat(self, *, defining_only: bool = False) -> dict[str, Any]:
        """Dotted key -> value. ``defining_only`` drops ENVIRONMENT_KEYS."""
        out = flatten(self.model_dump(mode="json"))
        if defining_only:
            out = {k: v for k, v in out.items() if k not in ENVIRONMENT_KEYS}
        return out

    def _hash(self, keep: Any) -> str:
        # Only values that differ from the defaults are hashed, so adding a field with a default
        # never changes an existing key. A changed default goes into HASHED_AT_DEFAULT.
        explicit = flatten(self.model_dump(mode="json", exclude_defaults=True))
        explicit |= {k: v for k, v in self.flat().items() if k in HASHED_AT_DEFAULT}
        payload = {k: v for k, v in sorted(explicit.items()) if k not in ENVIRONMENT_KEYS and keep(k)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def stage1_key(self) -> str:
        """Stable hash of exactly what determines the stage-I run."""
        return self._hash(lambda k: k.startswith(STAGE1_PREFIXES))

    def config_hash(self) -> str:
        """Stable hash of the whole experiment-defining config."""
        return self._hash(lambda k: True)

    @property
    def final_set(self) -> str:
        return "F5" if self.model.side == "none" else FINAL_SET

    @property
    def eval_sets(self) -> list[str]:
        """The configured feature sets that this model has (F5 only without side branches)."""
        if self.model.side == "none":
            return ["F5"]
        return list(self.eval.sets)

    def with_overrides(self, overrides: dict[str, Any] | list[str], source: str = "<overrides>") -> ExperimentConfig:
        """A new config with dotted overrides applied and validated."""
        data = self.model_dump(mode="json")
        for key, value in _parse_overrides(overrides, source).items():
            _set_dotted(data, key, value)
        return validate_config(data, source)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _parse_overrides(overrides: dict[str, Any] | list[str], source: str) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
        parsed[key.strip()] = parse_yaml(raw, f"{source}: override {item!r}") if raw.strip() else None
    return parsed


def describe_validation_error(
    err: ValidationError,
    source: str,
    what: str = "config",
    unknown: str = "unknown key (misspelled? the keys are the fields of pfe/config.py)",
) -> str:
    """Pydantic's errors as ``<source>: invalid <what>`` and one line per dotted key (a check across
    sections, with no key of its own, names its keys in its message)."""
    lines = [f"{source}: invalid {what}"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: {unknown}")
            continue
        got = problem.get("input")
        shown = "" if isinstance(got, dict) or len(repr(got)) > 80 else f" (got {got!r})"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}{shown}" if key else f"  {message}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a nested dict; errors become a ConfigError naming ``source`` and dotted keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (merge the two)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Safe-load YAML text; a syntax error or a repeated key becomes a ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {str(err).replace('<unicode string>', source)}") from None


def read_yaml(path: str | Path) -> Any:
    """Safe-load a YAML file; a missing, unreadable or malformed file becomes a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the YAML file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (a YAML config or study file is text)") from None
    return parse_yaml(text, str(path)) or {}


def load_config_text(text: str, source: str) -> ExperimentConfig:
    """A config from YAML text (a checkpoint's or an MLflow artifact's), errors naming ``source``."""
    return validate_config(parse_yaml(text, source), source)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] = ()) -> ExperimentConfig:
    """Load a YAML config (or the defaults) and apply dotted overrides."""
    source = str(path) if path else "<defaults>"
    data = read_yaml(path) if path else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections")
    for key, value in _parse_overrides(list(overrides) if not isinstance(overrides, dict) else overrides, source).items():
        _set_dotted(data, key, value)
    return validate_config(data, source)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what MLflow stores as an artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
