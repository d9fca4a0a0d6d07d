"""Typed configuration read from ``params.yaml``.

Every pipeline step (CLI, DVC stage, Prefect task) receives one of these objects; nothing
else in the package reads ``params.yaml``.  Unknown keys are an error that names the key, so a
typo in ``dvc exp run -S ...`` cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import datetime
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stlink.data.sources.registry import SOURCE_NAMES
from stlink.errors import ConfigError  # noqa: F401  (re-exported: the one error root is stlink.errors)


@dataclass
class SyntheticConfig:
    n_corridors: int = 3            # parallel/crossing highway corridors
    sensors_per_corridor: int = 12  # sensors along each corridor, both directions share the count
    days: int = 28                  # 4 weeks
    freq_minutes: int = 5
    start: str = "2024-01-01 00:00:00"  # a Monday
    seed: int = 0
    incident_rate_per_day: float = 1.0  # expected incidents per day over the whole network
    outage_rate_per_sensor: float = 0.5  # expected multi-hour outages per sensor over the period
    missing_rate: float = 0.002      # isolated missing readings (fraction)
    noise_mph: float = 1.5           # sensor noise std
    live: str = "off"                # off | day: each ingest appends one more simulated day | now: up to the clock
    live_horizon_days: int = 120     # live: the one simulated period that ingests reveal (prefix-stable)


@dataclass
class AdjacencyConfig:
    method: str = "auto"      # auto | gaussian | binary | given ; auto: given for dense inputs, gaussian for distances
    threshold: float = 0.1    # DCRNN: kernel entries below this are set to 0
    sigma: float | None = None  # kernel width; None = std of the edge distances (DCRNN)
    self_loops: bool = True   # A_ii = 1 (d_ii = 0 under the kernel)
    symmetric: bool = False   # keep road direction by default


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # name of the folder under data/raw and data/processed
    source: str = "synthetic"   # synthetic | pems | metrla | tgcn | byo
    path: str | None = None     # a local folder or file with the source files
    url: str | None = None      # download instead of copy (needs sha256)
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> expected sha256
    files: dict[str, str] = field(default_factory=dict)   # role -> file name inside `path` (see docs)
    start_time: str | None = None  # PEMS npz carries no timestamps: first timestamp
    freq: str | None = None        # PEMS npz carries no timestamps: pandas frequency, e.g. "5min"
    null_value: float = 0.0        # value that encodes a missing reading in the source
    channels: list[str] = field(default_factory=lambda: ["speed"])
    units: list[str] = field(default_factory=lambda: ["mph"])
    adjacency: AdjacencyConfig = field(default_factory=AdjacencyConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ValidationConfig:
    # physical bounds per channel name (inclusive); the null value is always allowed
    bounds: dict[str, list[float]] = field(default_factory=lambda: {
        "speed": [0.0, 120.0], "flow": [0.0, 3000.0], "occupancy": [0.0, 1.0]})
    max_missing_fraction: float = 0.5   # per sensor
    sparse_sensors: str = "drop"        # sensors missing more than that: drop (them and their edges, warned in
                                        # the report) | fail (the whole run)
    failed_rows_sample: int = 5         # bad rows quoted in the error message
    data_docs: bool = True              # also build GX Data Docs HTML


@dataclass
class PrepareConfig:
    input_len: int = 12
    output_len: int = 12
    split: list[float] | None = None  # train/val/test fractions; None = 6:2:2 for pems, else 7:1:2


@dataclass
class ModelConfig:
    arch: str = "stlink"        # stlink | stid (the STID reference MLP, same forward contract; no backbone)
    backbone: str = "smollm2"   # smollm2 | tiny | a local HF directory | a hub id (online only)
    n_layers: int = 1           # first decoder layers kept
    pretrained: bool = True     # false: same architecture, random weights (the "no pretraining" ablation)
    patch_len: int = 12         # steps per token (12 = one token per sensor and window)
    time_of_day: str = "fourier"  # fourier | embedding | off ; read at each patch's LAST step
    tod_harmonics: int = 6        # fourier: sin/cos of 1..K cycles per day
    day_of_week: str = "weekday_weekend"  # full | weekday_weekend | off (LOS-LOOP's test weekdays never occur in training)
    node_embedding: str = "free"  # free (learned vector per sensor) | laplacian (learned map of eigenvectors) | none
    node_eigvecs: int = 32      # Laplacian eigenvectors behind node_embedding=laplacian
    node_dim: int = 0           # free: 0 = a full-width vector per sensor; k > 0 = k numbers per sensor, mapped to the width
    graph_features: str = "off"  # diffusion (neighbours' readings, downstream and upstream, on each token) | off
    graph_bias: str = "off"     # hops: a learned attention bias per head and hop distance on the road graph | off
    graph_hops: int = 2         # diffusion: 1..hops steps along the road graph, each direction
    level_features: bool = True  # give the window mean and log std that RevIN removes back to the tokens
    revin: bool = True          # false: tokens see the global z-scored window (the level stays in the values)
    spatial_rope: str = "split"  # split | compose | off
    spatial_dim: int = 8        # Laplacian eigenvectors used for the sensor phases
    global_head: bool = False   # a second linear head added after RevIN in global z units (flat windows can still move)
    window_skip: str = "off"    # linear: a per-step linear map of the sensor's own z-scored window added to the forecast
                                # (initialised to repeat the last reading) | sensor: one such map per sensor | off
    head: str = "linear"        # linear | mlp (a trainable non-linearity after the frozen FFN: Linear-GELU-Linear)
    dropout: float = 0.0        # on the tokens entering the backbone and on its output before the head (training only)
    mrffn: str = "on"           # on | off
    mrffn_layers: int = 1       # last layers that get the memory read
    mrffn_query: str = "zscore"  # zscore (global z-scored window: keeps the level) | revin (the RevIN shape)
    mrffn_place: str = "input"  # input: added before the layer (its attention and FFN use it) | output: after it
    memory_size: int = 32       # M pattern keys
    memory_topk: int = 3        # k (PM-MemNet uses 3)
    revin_affine: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    tiny_hidden: int = 64       # the `tiny` random backbone (tests)
    tiny_heads: int = 4
    stid_dim: int = 32          # STID (model.arch=stid): width of each embedding (series, node, tod, dow)
    stid_layers: int = 3        # STID: residual MLP layers


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3            # new modules (embeddings, head, memory, phases, RevIN)
    lora_lr: float | None = None  # LoRA matrices; None = lr
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    input_mask_rate: float = 0.0  # augmentation: hide this share of the valid input readings in each training batch
    patience: int = 3
    seed: int = 42
    max_train_batches: int | None = None  # cap batches per epoch (CPU budget); None = all
    max_val_batches: int | None = None
    max_steps: int | None = None  # optimizer-step budget: the LR schedule anneals to 0 at min(this, epochs x batches)
    ema_decay: float = 0.0      # > 0: validate, keep and export an exponential moving average of the trained weights
    precision: str = "auto"     # auto (bf16 on CUDA, and on CPUs with native bf16: avx512_bf16/amx) | bf16 | fp32
    threads: int = 0            # torch intra-op threads on CPU; 0 = torch's default
    num_workers: int = 0
    device: str = "auto"        # auto | cpu | cuda


@dataclass
class ReferenceConfig:
    """The learned reference (STID) trained beside ST-LINK on the same windows (``train`` step)."""
    model: str = "stid"         # stid | none
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    patience: int = 5
    max_train_batches: int | None = None
    max_steps: int | None = None


@dataclass
class EvaluateConfig:
    mape_floor: float = 1.0     # |y| below this is excluded from MAPE only
    abrupt_quantile: float = 0.9   # abrupt slice: relative jumps above this quantile of the TRAINING windows' jumps
    abrupt_threshold: float | None = None  # or a fixed threshold: max |y[t+1]-y[t]| > this x sensor's training mean
    plot_sensors: int = 3
    batch_size: int = 64


@dataclass
class ExportConfig:
    optimize: bool = True       # also write model.opt.onnx: onnxruntime's transformer optimiser, parity-gated like model.onnx
    quantize: str = "none"      # none | int8: also write model.int8.onnx (dynamic int8 MatMul weights, CPU), accuracy-gated
    fp16: bool = False          # also write model.fp16.onnx for the CUDA provider, accuracy-gated (needs a GPU)
    max_mae_change: float = 0.01  # accuracy gate of int8/fp16: |test MAE / fp32 test MAE - 1| <= this
    accuracy_windows: int | None = None  # test windows (evenly spaced) scored for the gate; null = every test window


@dataclass
class ScoreConfig:
    model: str = "champion"     # champion (models:/<registered>@champion) | a models:/ URI | an .onnx path
    device: str = "auto"        # auto | cuda | cpu (onnxruntime provider; cuda fails unless CUDA really runs)
    format: str = "parquet"     # parquet | csv
    intra_op_threads: int = 0   # onnxruntime threads inside one operator; 0 = library default (one per physical core)
    inter_op_threads: int = 0   # onnxruntime threads across independent operators; 0 = library default (docs/benchmarks.md)
    variant: str = "fp32"       # fp32 | opt | int8 | fp16: which exported ONNX file of the model is scored (model.<v>.onnx)
    batch_size: int = 8         # windows per onnxruntime call (bench/bench_onnx.py figures in docs/benchmarks.md)


@dataclass
class IntervalsConfig:
    coverages: list[float] = field(default_factory=lambda: [0.8, 0.95])  # nominal coverages of the intervals
    scope: str = "pooled"       # pooled | sensor: one half-width per step, or per step and sensor (docs/method.md)
    forecast: str = "auto"      # auto: lower_/upper_ columns when the model card is calibrated | required | off


@dataclass
class DriftConfig:
    threshold: float = 0.3      # share of drifted sensors (or a drifted global test) that raises the warning
    p_value: float = 0.01       # per-test significance of the distribution tests
    missing_increase: float = 0.2  # a sensor whose missing fraction exceeds training's by this is drifted
    level_sigma: float = 3.0    # a sensor whose window mean is this many training stds away is drifted
    ks_statistic: float = 0.3   # ... and a KS test drifts only with p < p_value and D above this (effect size)
    window_days: float = 1.0    # the input compared: the last this many days before the issue time
    retrain_on_drift: bool = False  # batch_forecast flow: start the nightly retrain deployment when drift is flagged
    retrain_deployment: str = "training-pipeline/stlink-nightly-retrain"  # <flow>/<deployment> it starts


@dataclass
class MonitorConfig:
    mae_threshold: float = 0.25  # flag when realised MAE > (1 + this) x the champion's test MAE
    report_sensors: int = 3      # sensors shown in the forecast report's fan chart
    report_step: int = 0         # horizon step of the report's map colour (0 = the last step)
    history_days: int = 30       # days of realised accuracy shown in the report
    after_forecast: bool = True  # drift check + HTML report beside every batch forecast (stlink/monitoring/batch.py)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None        # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns/mlflow.db
    artifact_location: str | None = None   # artifact root of a new experiment; None: <db folder>/artifacts for SQLite
    experiment: str = "stlink"
    registered_model: str | None = None    # None: stlink-<dataset>


@dataclass
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def processed_dir(self) -> Path:
        return Path("data/processed") / self.data.dataset

    @property
    def raw_dir(self) -> Path:
        return Path("data/raw") / self.data.dataset

    @property
    def report_dir(self) -> Path:
        """Validation reports, metrics and plots of this dataset."""
        return Path("reports") / self.data.dataset

    @property
    def model_dir(self) -> Path:
        """Checkpoints and the trained model of this dataset."""
        return Path("models") / self.data.dataset

    @property
    def export_dir(self) -> Path:
        """The exported ONNX model (model.onnx + its model.json card) of this dataset."""
        return Path("models") / "exported" / self.data.dataset


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn a nested dict into dataclass ``cls``; unknown keys raise ``ConfigError``."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(hint, value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (datetime.date, datetime.datetime)):
        return str(value)  # YAML reads a bare 2012-03-01 00:00:00 as a datetime
    if hint is str and isinstance(value, bool):
        # YAML 1.1 (PyYAML) reads a bare on/off as a bool; DVC rewrites params.yaml without quotes
        return "on" if value else "off"
    if hint in (int, str, bool):
        if hint is int and isinstance(value, bool) or not isinstance(value, hint):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return value


CHOICES: dict[str, tuple[str, ...]] = {  # params whose value is one of a few words
    "data.source": SOURCE_NAMES,  # the table of loaders, stlink/data/sources/registry.py
    "model.spatial_rope": ("split", "compose", "off"),
    "model.mrffn": ("on", "off"),
    "validation.sparse_sensors": ("drop", "fail"),
    "train.device": ("auto", "cpu", "cuda"),
    "model.graph_features": ("diffusion", "off"),
    "model.graph_bias": ("hops", "off"),
    "model.window_skip": ("linear", "sensor", "off"),
    "score.device": ("auto", "cuda", "cpu"),
    "score.format": ("parquet", "csv"),
    "score.variant": ("fp32", "opt", "int8", "fp16"),
}


def check_params(params: Params) -> Params:
    """Values that fit the types but not the pipeline, refused when the params are read (one line each).

    Positive sizes, non-negative rates and counts (``train.lr=0`` freezes the weights: a valid
    control run), choices (``CHOICES``), and ``model.patch_len`` dividing
    ``prepare.input_len`` (the model cuts the input window into whole patches).
    """
    def get(key: str) -> Any:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        return node

    for key, choices in CHOICES.items():
        if get(key) not in choices:
            raise ConfigError(f"{key}={get(key)!r}: one of {', '.join(choices)}")
    if not 0.0 <= params.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={params.train.ema_decay!r}: must be in [0, 1) (0 = off)")
    if not 0.0 <= params.train.input_mask_rate < 1.0:
        raise ConfigError(f"train.input_mask_rate={params.train.input_mask_rate!r}: must be in [0, 1)")
    for key in ("prepare.input_len", "prepare.output_len", "model.patch_len", "model.n_layers", "model.graph_hops",
                "train.batch_size", "evaluate.batch_size", "score.batch_size"):
        if get(key) < 1:
            raise ConfigError(f"{key}={get(key)!r}: must be at least 1")
    for key in ("train.lr", "train.epochs", "train.weight_decay", "train.warmup_steps", "train.patience", "model.node_dim"):
        if get(key) < 0:
            raise ConfigError(f"{key}={get(key)!r}: must be >= 0")
    if params.prepare.input_len % params.model.patch_len:
        raise ConfigError(f"model.patch_len={params.model.patch_len} must divide prepare.input_len="
                          f"{params.prepare.input_len} (the input window is cut into whole patches)")
    return params


def params_from_dict(raw: dict | None) -> Params:
    return check_params(_build(Params, raw or {}, "params"))


DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read a params file and apply ``key.sub=value`` overrides (YAML-parsed values).

    ``path=None``: ``./params.yaml`` when there is one, else the code defaults.  A file that is
    named explicitly must exist (a mistyped ``--params`` must not run on the defaults).
    """
    if path is None:
        path = DEFAULT_PARAMS
    elif not Path(path).is_file():
        raise ConfigError(f"{path}: no such params file" + (" (it is a folder)" if Path(path).is_dir() else ""))
    path = Path(path)
    raw: dict = {}
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
