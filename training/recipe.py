"""The training recipe: one YAML file, every training-side knob, validated.

A recipe has the sections the paper's Appendix B audits: data, adapter, optimizer,
schedule/batch, precision and seeds, plus an optional ``talan`` section (the treatment).
Two recipes that differ only in ``talan`` (and ``name``/``output_dir``) are a matched pair.

Relative paths (``train_file``, ``output_dir``, a local ``base_model``) are read from the
directory you run ``talan-train`` in, like the repository's own recipes expect (run them
from the repository root).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from talan_serve.config import TalanConfig, TalanConfigError
from talan_serve.presets import PAPER_CONFIGS, preset

ADAPTER_TYPES = ("lora", "dora", "rslora")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("cosine",)
GENERATORS = ("arithmetic",)
# How the processes of one run share the work (training/distributed.py).
ENGINES = ("ddp", "fsdp", "deepspeed")
TRACKERS = ("none", "tensorboard", "wandb")
# The copy of its recipe that every run and training checkpoint keeps.
RECIPE_COPY = "recipe.yaml"


class RecipeError(ValueError):
    """A recipe that cannot be run as written (unknown field, bad value)."""


@dataclass
class DataConfig:
    """Training data.

    Attributes:
        train_file: JSONL, one example a line: ``{"messages": [...]}`` (chat) or
            ``{"prompt": ..., "completion": ...}`` (rendered as a user/assistant turn).
        max_length: tokens per example after the chat template; longer ones are cut at
            the right and counted in the truncation report (never silently).
        generate: if ``train_file`` does not exist, write it (and its held-out sibling)
            with this project generator first (``arithmetic``); None: the file must exist.
        generate_train: examples in the generated training split.
        generate_heldout: examples in the generated held-out split.
        generate_seed: seed of the generator (independent of the training seeds).
        eval_file: held-out JSONL in the same format; its loss is computed every
            ``schedule.eval_steps`` steps.
    """

    train_file: str
    max_length: int = 1024
    generate: str | None = None
    generate_train: int = 2000
    generate_heldout: int = 200
    generate_seed: int = 1234
    eval_file: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_length", "generate_train", "generate_heldout")
        if self.generate is not None and self.generate not in GENERATORS:
            raise RecipeError(f"data.generate: unknown generator {self.generate!r}; "
                              f"known: {', '.join(GENERATORS)}")


@dataclass
class AdapterConfig:
    """The PEFT adapter (trained in both runs of a matched pair).

    Attributes:
        type: ``lora``, ``dora`` (weight-decomposed) or ``rslora`` (rank-stabilised scale).
        r: rank; alpha: scaling numerator (alpha/r, or alpha/sqrt(r) for rslora).
        dropout: dropout on the adapter input.
        target_modules: module name suffixes that get an adapter.
        bias: PEFT's ``bias`` option (``none``, ``all``, ``lora_only``).
    """

    type: str = "lora"
    r: int = 32
    alpha: float = 64
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.type not in ADAPTER_TYPES:
            raise RecipeError(f"adapter.type: unknown {self.type!r}; "
                              f"expected one of {', '.join(ADAPTER_TYPES)}")
        _positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise RecipeError("adapter.target_modules must name at least one module")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.target_modules = list(self.target_modules)


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with linear warmup, as in the paper's Appendix B."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lr", "adam_eps")
        if self.weight_decay < 0:
            raise RecipeError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.scheduler not in SCHEDULERS:
            raise RecipeError(f"optim.scheduler: unknown {self.scheduler!r}")
        if len(self.betas) != 2:
            raise RecipeError(f"optim.betas needs two values, got {self.betas!r}")
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
        self.warmup_ratio, self.adam_eps = float(self.warmup_ratio), float(self.adam_eps)
        self.betas = [float(b) for b in self.betas]
        if self.max_grad_norm is not None:
            self.max_grad_norm = float(self.max_grad_norm)


@dataclass
class ScheduleConfig:
    """Batching and length of the run. One step = one optimizer update.

    Attributes:
        per_device_batch_size: examples per process per micro-batch.
        grad_accum: micro-batches per step, per process (``TrainingArguments``'s
            ``gradient_accumulation_steps``): effective batch = per_device_batch_size x
            grad_accum x processes.
        world_size: the number of processes the recipe is written for; a launch with
            another number is refused (``--keep-effective-batch`` rescales grad_accum).
            None: any number, and the effective batch grows with it.
        save_steps: write a full training checkpoint (adapter, TALAN, optimizer,
            scheduler, RNG, data position) into ``output_dir/checkpoint-N`` every N
            steps, for ``talan-train --resume``; save_total_limit keeps the newest ones.
        eval_steps: held-out loss (``data.eval_file``) every N steps.
    """

    max_steps: int = 78
    per_device_batch_size: int = 4
    grad_accum: int = 8
    precision: str = "auto"
    gradient_checkpointing: bool = True
    log_every: int = 1
    world_size: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "per_device_batch_size", "grad_accum", "log_every")
        for name in ("world_size", "save_steps", "save_total_limit", "eval_steps"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.precision not in PRECISIONS:
            raise RecipeError(f"schedule.precision: unknown {self.precision!r}; "
                              f"expected one of {', '.join(PRECISIONS)}")


@dataclass
class DistributedConfig:
    """How the processes of a launch share the run (one process: no sharing at all).

    Attributes:
        engine: ``ddp`` (replicas, gradients all-reduced), ``fsdp`` (parameters,
            gradients and optimizer state sharded, torch FSDP2) or ``deepspeed``
            (ZeRO, the paper's setup).
        config: the engine's JSON config (FSDP: ``fsdp_config``; DeepSpeed: its config
            file); None takes the one shipped in ``training/distributed/``.
    """

    engine: str = "ddp"
    config: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise RecipeError(f"distributed.engine: unknown {self.engine!r}; "
                              f"expected one of {', '.join(ENGINES)}")
        if self.engine == "ddp" and self.config is not None:
            raise RecipeError("distributed.config: DDP takes no config file")


@dataclass
class TrackingConfig:
    """Where the run reports besides its own ``train_log.jsonl`` (not a training input).

    ``report_to``: ``none``, ``tensorboard`` (event files under ``output_dir/runs``) or
    ``wandb`` (always offline: ``output_dir/wandb``, for ``wandb sync`` later).
    """

    report_to: str = "none"

    def __post_init__(self) -> None:
        if self.report_to not in TRACKERS:
            raise RecipeError(f"tracking.report_to: unknown {self.report_to!r}; "
                              f"expected one of {', '.join(TRACKERS)}")


@dataclass
class TalanSection:
    """The treatment: a preset and/or explicit TalanConfig fields.

    ``hidden_size`` may be left out (or ``auto``): it is taken from the host model.
    ``init_seed`` seeds the block's random initialisation on its own generator, so
    creating it does not move the global RNG that the adapter init and dropout use.
    """

    preset: str | None = None
    init_seed: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def resolve(self, hidden_size: int) -> TalanConfig:
        record = dict(self.fields)
        if record.get("hidden_size", "auto") == "auto":
            record["hidden_size"] = hidden_size
        try:
            if self.preset is not None:
                return preset(self.preset, **record)
            return TalanConfig.from_dict(record)
        except TalanConfigError as err:
            raise RecipeError(f"talan: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "init_seed": self.init_seed, **self.fields}


@dataclass
class Recipe:
    """One training run: base model + data + adapter + optimizer + schedule (+ TALAN)."""

    name: str
    base_model: str
    output_dir: str
    data: DataConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    data_seed: int = 42
    talan: TalanSection | None = None
    # Free text carried into the manifest (where the numbers come from); not audited.
    notes: str = ""

    def __post_init__(self) -> None:
        if self.schedule.eval_steps is not None and self.data.eval_file is None:
            raise RecipeError("schedule.eval_steps needs data.eval_file (the held-out JSONL)")

    @property
    def warmup_steps(self) -> int:
        # HF Trainer's rule for warmup_ratio: ceil(ratio * max_steps).
        import math

        return math.ceil(self.optim.warmup_ratio * self.schedule.max_steps)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["talan"] = None if self.talan is None else self.talan.to_dict()
        return record

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Recipe:
        if not isinstance(record, dict):
            raise RecipeError("a recipe is a YAML mapping")
        record = dict(record)
        sections = {"data": DataConfig, "adapter": AdapterConfig, "optim": OptimConfig,
                    "schedule": ScheduleConfig, "distributed": DistributedConfig,
                    "tracking": TrackingConfig}
        for key, kind in sections.items():
            if key in record:
                record[key] = _build(kind, record[key], key)
        if "data" not in record:
            raise RecipeError("recipe: missing section 'data'")
        talan = record.get("talan")
        if talan is not None:
            if not isinstance(talan, dict):
                raise RecipeError("talan: expected a mapping (or null for the LoRA-only run)")
            talan = dict(talan)
            name = talan.pop("preset", None)
            if name is not None and name not in PAPER_CONFIGS:
                raise RecipeError(
                    f"talan.preset: unknown {name!r}; known: {', '.join(PAPER_CONFIGS)}")
            record["talan"] = TalanSection(preset=name, init_seed=talan.pop("init_seed", None),
                                           fields=talan)
            if name is not None and record.get("base_model") is None:
                # A paper preset names its host (talan_serve.presets).
                record["base_model"] = PAPER_CONFIGS[name].base_model
        if record.get("base_model") is None:
            raise RecipeError("recipe: missing base_model (or a talan.preset that names one)")
        return _build(cls, record, "recipe")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            record = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        try:
            return cls.from_dict(record)
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from None


def _build(kind: type, record: Any, where: str) -> Any:
    if not isinstance(record, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(record).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return kind(**record)
    except TypeError as err:
        raise RecipeError(f"{where}: {err}") from None


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise RecipeError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")
