"""A model family is one spec object: everything family-specific, in the family's own package.

torchtitan's principle (a model is a `TrainSpec`: model, parallelize/pipeline, conversion) with nanoGPT's
readability. The launcher, parallel engine, outlier evaluation, study, planner and export code never branch
on a family's name; they ask its spec:

    spec = family_of(cfg.model)                  # or spec_for("opt")
    model = spec.build(cfg.model, seq_length)    # single process, or tensor-parallel with a `layers` factory
    data = spec.data(cfg, dp_rank, dp_world)     # resumable training stream + this rank's validation examples
    batch = spec.collate(examples)               # a typed Batch(inputs, labels), not a bare tensor
    loss = model(batch.inputs, labels=batch.labels)

Families register themselves with `register_family(spec)`. The built-in ones (`model/opt/`, `model/bert/`,
`model/vit/`, `model/stanhop/`) are imported on first lookup. A family outside this repository is named in a
config as `model.family: package.module:SPEC` (the spec object's import path) and is imported and registered
the first time it is looked up, in every process (`launcher.pretrain` under `deepspeed` included).

A new family is one package: subclass `FamilySpec`, fill in what it supports, register it. The spec provides
pieces rather than yes/no flags: its objective, tensor-parallel split, pipeline stages, planner cost model,
Hugging Face adapter and throughput unit; a piece a family lacks is None, and whoever needs it says so in one
line naming the family. Everything not overridden either has a family-neutral default (loss-weighted metrics,
no pipeline, no HF export) or says in one line that the family does not support it.
"""

from __future__ import annotations

import importlib
import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator, Protocol, Union

import torch
from torch import nn

from common.errors import ConfigError
from common.plugins import find_registered, import_named
from model.attention_config import AttentionConfig
from model.hf_adapter import HFAdapter

if TYPE_CHECKING:
    from deepspeed.pipe import LayerSpec

    from model.layers import LocalLayers

# Built-in families, imported lazily (model packages pull in heavy dependencies such as timm or entmax).
BUILTIN_FAMILIES = {"opt": "model.opt", "bert": "model.bert", "vit": "model.vit", "stanhop": "model.stanhop"}

# The Auto class of an exported causal LM: what lm-eval loads (launcher/lm_eval.py).
CAUSAL_LM_CLASS = "AutoModelForCausalLM"

# One training example as a family's data makes it: a token block [seq] (OPT), masked ids + labels [2, seq]
# (BERT), (pixels, class) (ViT), (input window, target window) (STanHop-Net).
Example = Union[torch.Tensor, tuple[torch.Tensor, Union[torch.Tensor, int]]]


class ModelSection(Protocol):
    """A family's `model:` section (the dataclass its spec names as model_config_class)."""

    family: str  # the registered family name, or package.module:SPEC
    attention: AttentionConfig

    def validate(self) -> None: ...


class Section(Protocol):
    """A config section that checks itself (one ConfigError line), e.g. a family's `data:` section."""

    def validate(self) -> None: ...


class TrainSection(Protocol):
    micro_batch_size: int
    global_batch_size: int
    seed: int


class EvalSection(Protocol):
    max_blocks: int | None  # validation examples per evaluation (None: the whole split)
    calibration_batches: int
    calibration_batch_size: int


class RunSettings(Protocol):
    """A run config as a family reads it (launcher.config.RunConfig): the family's own `model:` and `data:`
    sections (model_config_class, data_config_class) and the shared `train:` and `eval:` ones."""

    @property
    def model(self) -> ModelSection: ...
    @property
    def data(self) -> Section: ...
    @property
    def train(self) -> TrainSection: ...
    @property
    def eval(self) -> EvalSection: ...


class CostModel(Protocol):
    """launcher.plan's memory and FLOPs model of a family (model/text_spec.py's for the transformers)."""

    ffn_activation_terms: int  # FFN activations [tokens, ffn/t] one layer keeps for backward
    embedding_norm: bool  # the first stage keeps an embedding LayerNorm's input

    def embedding_params(self, cfg: ModelSection, tp: int = 1) -> tuple[int, int]: ...
    def head_activations(self, cfg: ModelSection, tokens: int, act_bytes: int,
                         data_cfg: Section | None = None) -> tuple[float, int]: ...
    def flops_per_token(self, cfg: ModelSection, seq_length: int, data_cfg: Section | None = None) -> float: ...


class TextTokenizer(Protocol):
    """What a text family's tokenizer provides to lm-eval and the export (data_pipeline's tokenizers)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


@dataclass(frozen=True)
class Batch:
    """A micro-batch as the model takes it: `model(batch.inputs, labels=batch.labels)` returns the mean loss.

    inputs: token ids [B, T] (OPT, BERT: masked ids), pixels [B, C, H, W] (ViT), series [B, L, N] (STanHop).
    labels: what the loss compares against (shape decided by the family); -100 marks positions without a target.
    """

    inputs: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels): what DeepSpeed's pipeline engine takes from its data iterator."""
        return self.inputs, self.labels


class ResumableStream(Protocol):
    """An endless iterator of examples whose position is part of a checkpoint."""

    def __iter__(self) -> Iterator[Example]: ...
    def __next__(self) -> Example: ...
    def state_dict(self) -> dict[str, object]: ...
    def load_state_dict(self, state: dict[str, object]) -> None: ...


@dataclass
class FamilyData:
    """What one data-parallel rank trains and validates on."""

    train: ResumableStream  # endless, resumable examples of this rank
    validation: list[Example]  # this rank's fixed validation examples (global example i goes to rank i % dp_world)
    tokenizer: TextTokenizer | None = None  # text families: the run's tokenizer (lm-eval, export); None otherwise
    # A blend's validation examples per source name, for per-source metrics ({} for one source).
    validation_by_source: dict[str, list[Example]] = field(default_factory=dict)
    # This rank's share of the test split, evaluated once at the end of a completed run (test_<metric>); None
    # for a family without a test split (the same on every rank: the evaluation is a collective).
    test: list[Example] | None = None


@dataclass(frozen=True)
class BackcopyTask:
    """What the task-aware sink metrics (outliers/backcopy.py) split queries by on the Bigram-Backcopy task: the
    trigger token ids, and the first id of an ordinary (character) token; lower ids are specials (BOS, EOS),
    counted as neither kind. The family provides it (it knows its data); the evaluation only reads it."""

    trigger_ids: tuple[int, ...]
    first_token_id: int


@dataclass(frozen=True)
class Metric:
    """A validation metric a family reports next to the loss (`val_<name>` in logs, summary, TensorBoard)."""

    name: str  # e.g. "ppl", "top1", "mse"
    label: str  # printed name, e.g. "ppl", "top-1", "MSE"
    higher_is_better: bool = False
    fmt: str = ".2f"
    summary_label: str = ""  # the run summary's longer name, e.g. "MLM ppl" (default: label)
    description: str = ""  # what the numbers are, for study headers, e.g. "MLM perplexities"


class Objective(Protocol):
    """What a family trains for, named in the run summary (`objective`: "causal", "mlm", "classification", ...);
    the text families' also make their examples (data_pipeline/examples.py's `TextObjective`)."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class NamedObjective:
    """An objective whose examples and loss the family's spec makes itself (ViT, STanHop-Net): its name."""

    name: str


@dataclass(frozen=True)
class Throughput:
    """How a family counts what it trains on (the training log's and summary's `<unit>_per_s` and `<unit>`, and
    the FLOPs per unit behind TFLOP/s and MFU): text families count tokens, an image family images, a
    forecasting family windows."""

    unit: str  # plural, e.g. "tokens", "images", "windows"
    # How many units one example is (one image or window: 1); None: its positions, FamilySpec.example_length
    per_example: Callable[[RunSettings], int] | None = None


@dataclass(frozen=True)
class TensorSplit:
    """A family's tensor parallelism (Megatron's column/row split of attention heads and FFN, through the
    `layers` factory its `build` takes): the `model:` keys whose sizes parallel.tensor must divide. A family
    without one (None) runs with parallel.tensor=1 only."""

    keys: tuple[str, ...] = ()

    def check(self, cfg: ModelSection, tensor: int) -> None:
        for key in self.keys:
            size = getattr(cfg, key)
            if size % tensor:
                raise ConfigError("parallel.tensor", tensor, f"must divide model.{key}={size}")


TRANSFORMER_SPLIT = TensorSplit(("num_heads", "ffn_hidden_size", "hidden_size"))  # OPT, BERT, ViT


class PipelineStages(Protocol):
    """A family's DeepSpeed pipeline (parallel/pipeline.py): its stages and the names of their parameters."""

    def parts(self, cfg: ModelSection, seq_length: int, layers: LocalLayers) -> PipelineParts: ...
    def canonical_name(self, name: str, cfg: ModelSection) -> str:
        """A PipelineModule parameter name -> the single-process model's name."""
        ...


@dataclass(frozen=True)
class StagesModule:
    """PipelineStages defined as two functions of one module, `pipeline_parts(cfg, seq_length, layers)` and
    `canonical_name(name, cfg)` (model/<family>/pipeline.py), imported on first use: DeepSpeed's pipe module
    takes seconds to import and a single-process run never needs it."""

    module: str

    def parts(self, cfg: ModelSection, seq_length: int, layers: LocalLayers) -> PipelineParts:
        parts: PipelineParts = importlib.import_module(self.module).pipeline_parts(cfg, seq_length, layers)
        return parts

    def canonical_name(self, name: str, cfg: ModelSection) -> str:
        return str(importlib.import_module(self.module).canonical_name(name, cfg))


@dataclass(frozen=True)
class PipelineParts:
    """A family's DeepSpeed pipeline: LayerSpecs in order, the loss of the last stage, the repeated block's
    class name (partition method `type:<layer_class>`)."""

    specs: list[LayerSpec]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layer_class: str


def add_sums(total: dict[str, float], sums: dict[str, float]) -> None:
    """Add one batch's `FamilySpec.eval_sums` to a running total (the engine's and the report's evaluations)."""
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value


class FamilySpec(ABC):
    """Everything specific to one model family. Subclass it in `model/<family>/` and register an instance."""

    name: ClassVar[str]
    model_config_class: ClassVar[type]  # the `model:` section (a dataclass with family, attention, validate())
    data_config_class: ClassVar[type]  # the `data:` section
    objective: ClassVar[Objective]  # what the family trains for (the summary's `objective` is its name)
    metrics: ClassVar[tuple[Metric, ...]] = ()  # reported next to the loss; the first is the headline
    # What the training log's throughput counts (`tokens_per_s` for text; the family names its own unit)
    throughput: ClassVar[Throughput] = Throughput("tokens")
    target_unit: ClassVar[str] = "tokens"  # what num_targets counts, named so in val/test records (images, points)
    # The pieces a parallel layout needs; None: the family refuses that layout in one line (check_layout)
    tensor_parallel: ClassVar[TensorSplit | None] = TensorSplit()
    pipeline_stages: ClassVar[PipelineStages | None] = None
    ptq_weight_range: ClassVar[str] = "mse"  # W8A8 weight-range recipe for eval.w8a8_weight_range=auto
    clipped_softmax_alpha: ClassVar[float | None] = None  # launcher.study's clipped recipe: gamma = -alpha / T
    # Class names of the repeated blocks (their subclasses too, e.g. the pipeline's): what full activation
    # recompute and train.compile apply to (model/recompute.py, model/compile.py)
    block_types: ClassVar[tuple[str, ...]] = ()
    # parallel.activation_checkpointing modes it supports (selective needs model/attention.py's MultiHeadAttention)
    recompute_modes: ClassVar[tuple[str, ...]] = ("none", "full", "selective")

    # ------------------------------------------------------------------ model and config
    @abstractmethod
    def build(self, cfg: ModelSection, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        """The single-process model (or, with a tensor-parallel `layers` factory, this rank's shard)."""

    def validate_model(self, cfg: ModelSection) -> None:
        """Family-specific checks of the `model:` section beyond its own validate() (one ConfigError line)."""

    def validate_run(self, cfg: RunSettings) -> None:
        """Checks across sections of a run config (e.g. data length vs the model's positions)."""

    def cache_dir(self, cfg: RunSettings) -> str | None:
        """The folder the family's data caches files in (tokenizers, corpora, datasets' cache), or None. A run
        that fails on bad data leaves nothing new there; it must be writable (launcher.preflight)."""
        return None

    def example_length(self, cfg: RunSettings) -> int:
        """Positions per example that the model attends over (tokens, patches + class token, segments)."""
        return int(cfg.data.seq_length)

    # ------------------------------------------------------------------ data
    @abstractmethod
    def data(self, cfg: RunSettings, dp_rank: int = 0, dp_world: int = 1) -> FamilyData:
        """The training stream and validation examples of one data-parallel rank (bad input: ProjectError)."""

    @abstractmethod
    def calibration_examples(self, cfg: RunSettings, count: int) -> list[Example]:
        """The first `count` examples of the seeded training stream (W8A8 calibration; prepared data: its
        validation split's)."""

    def validation_examples(self, cfg: RunSettings) -> list[Example]:
        """Every validation example of an outlier evaluation (one process, eval.max_blocks of them)."""
        return self.data(cfg).validation

    def backcopy_task(self, cfg: RunSettings) -> BackcopyTask | None:
        """The Bigram-Backcopy task's token roles when this run is evaluated on that task alone, else None."""
        return None

    def test_examples(self, cfg: RunSettings, limit: int | None = None) -> list[Example] | None:
        """The test split's examples (all, or `limit` of them), or None for a family without a test split."""
        return None

    @abstractmethod
    def collate(self, examples: list[Example]) -> Batch:
        """Stack examples into a Batch."""

    def train_batch_transform(self, cfg: RunSettings) -> Callable[[Batch], Batch] | None:
        """A batch-level training augmentation (e.g. mixup), or None. It must be a pure function of the batch
        (and the config), so that a resumed run transforms every batch as the uninterrupted one did."""
        return None

    def train_batches(self, cfg: RunSettings, examples: Iterable[Example]) -> Iterator[Batch]:
        """The training micro-batches launcher.pretrain feeds: `batches`, then `train_batch_transform`."""
        batches = self.batches(examples, cfg.train.micro_batch_size)
        transform = self.train_batch_transform(cfg)
        return batches if transform is None else map(transform, batches)

    def batches(self, examples: Iterable[Example], micro_batch_size: int) -> Iterator[Batch]:
        """Consecutive examples collated into micro-batches (a partial tail is dropped)."""
        it = iter(examples)
        while True:
            chunk = list(itertools.islice(it, micro_batch_size))
            if len(chunk) < micro_batch_size:
                return
            yield self.collate(chunk)

    # ------------------------------------------------------------------ loss and metrics
    @abstractmethod
    def num_targets(self, batch: Batch) -> int:
        """How many predictions the batch's mean loss averages over (its weight in a weighted mean)."""

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Additive sums of one evaluation batch: at least `loss_sum` (loss x targets) and `targets`."""
        targets = self.num_targets(batch)
        return {"loss_sum": float(model(batch.inputs, labels=batch.labels)) * targets, "targets": float(targets)}

    def finish_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Summed eval_sums over batches and ranks -> {"loss", metric names...}. Default: perplexity."""
        loss = sums["loss_sum"] / max(sums["targets"], 1.0)
        return {"loss": loss, **self.metrics_from_loss(loss)}

    def reference_values(self, cfg: RunSettings) -> dict[str, float]:
        """Baselines a run's summary reports next to its metrics, e.g. {"uniform_ppl": vocabulary size}."""
        return {}

    def metrics_from_loss(self, loss: float) -> dict[str, float]:
        """Metrics that follow from the mean loss alone (what a pipeline's last stage can report)."""
        return {"ppl": math.exp(loss) if loss < 700 else float("inf")} if any(
            m.name == "ppl" for m in self.metrics) else {}

    # ------------------------------------------------------------------ parallel layouts
    def check_layout(self, cfg: ModelSection, tensor: int, pipeline: int) -> None:
        """One line when the family cannot run this layout (no TP / pipeline piece, heads not divisible by TP)."""
        if tensor > 1 and self.tensor_parallel is None:
            raise ConfigError("parallel.tensor", tensor, f"must be 1: model.family={self.name} has no tensor "
                              "parallelism (it is small enough for data parallelism)")
        if tensor > 1 and self.tensor_parallel is not None:
            self.tensor_parallel.check(cfg, tensor)
        if pipeline > 1 and self.pipeline_stages is None:
            raise ConfigError("parallel.pipeline", pipeline, f"must be 1: model.family={self.name} has no pipeline "
                              "parallelism (it is small enough for data parallelism)")
        layers = getattr(cfg, "num_layers", None)
        if layers is not None and pipeline > layers:
            raise ConfigError("parallel.pipeline", pipeline, f"exceeds model.num_layers={layers}: every "
                              "pipeline stage needs at least one layer")

    # ------------------------------------------------------------------ outliers and quantization
    @abstractmethod
    def outlier_modules(self, model: nn.Module) -> dict[str, str]:
        """Statistics name -> kind: the activations the outlier protocol hooks (outliers/stats.py names)."""

    def residual_streams(self, model: nn.Module) -> list[str]:
        """Per layer, the statistics name of the residual stream after it (attention-sink metrics)."""
        return []

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The outermost modules of `model` (single-process or a pipeline stage) whose class is, or derives from,
        one of `block_types`, in order."""
        found = [m for m in model.modules() if any(c.__name__ in self.block_types for c in type(m).__mro__)]
        inner = {id(child) for module in found for child in module.modules() if child is not module}
        return [module for module in found if id(module) not in inner]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Each layer's attention module, in order (attention-sink metrics); [] if none."""
        from model.attention import MultiHeadAttention

        return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]

    def ptq_fp32_modules(self, model: nn.Module) -> set[str]:
        """Module names that W8A8 evaluation keeps in fp32, with everything under them (e.g. an output head).
        Default: the attention gates (their parameters and sigmoid output are softmax parameters, like the
        sink logits, which no quantizer touches)."""
        from model.attention import HeadGate

        return {name for name, module in model.named_modules() if isinstance(module, HeadGate)}

    def ptq_tied_embeddings(self, model: nn.Module) -> set[str]:
        """Embedding modules whose weight is also the fp32 output head: W8A8 lookups read a quantized copy
        while the head reads the weight. Default: the one whose weight is `model.lm_head_weight`, if any."""
        head = getattr(model, "lm_head_weight", None)
        return {name for name, module in model.named_modules()
                if head is not None and getattr(module, "weight", None) is head}

    # ------------------------------------------------------------------ cost
    @abstractmethod
    def flops_per_example(self, cfg: RunSettings) -> float:
        """Training FLOPs (forward + backward) of one example (PaLM's 6N + attention accounting)."""

    def synthetic_batch(self, cfg: RunSettings, generator: torch.Generator) -> Batch:
        """A random micro-batch of the run's shapes (launcher/memory_probe.py measures activations with it)."""
        raise ConfigError("model.family", self.name, "has no memory model for launcher.plan")

    def cost_model(self) -> CostModel | None:
        """launcher.plan's model of this family's memory and step time, or None: the planner refuses it."""
        return None

    # ------------------------------------------------------------------ export
    hf: ClassVar[HFAdapter | None] = None  # the Hugging Face / timm adapter (model/<family>/hf.py), or None: no export

    def causal_lm_export(self) -> HFAdapter | None:
        """The adapter when the family's export loads as a causal LM (`AutoModelForCausalLM`: what the
        lm-evaluation-harness scores), else None."""
        adapter = self.hf
        return adapter if adapter is not None and adapter.auto_class == CAUSAL_LM_CLASS else None


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, name: str | None = None) -> FamilySpec:
    """Make `spec` known under `name` (default spec.name); re-registering a name replaces it."""
    _REGISTRY[name or spec.name] = spec
    return spec


def known_families() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN_FAMILIES))


def spec_for(name: str) -> FamilySpec:
    """The family registered as `name`: a built-in family, or `package.module:ATTR` (imported on first use)."""
    spec = find_registered(_REGISTRY, name, BUILTIN_FAMILIES, lambda path: import_named(path, FamilySpec, "model.family"))
    if spec is None:
        raise ConfigError("model.family", name, f"must be one of {', '.join(known_families())} or package.module:SPEC")
    return spec


def family_of(model_cfg: ModelSection) -> FamilySpec:
    """The spec of a model config (anything with a `family` attribute, e.g. cfg.model)."""
    return spec_for(model_cfg.family)


def build_model(cfg: ModelSection, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
    """The single-process (or, with a TP `layers` factory, tensor-parallel) model of `cfg.family`. Its `config`
    is the model section it was built from (the outlier evaluation finds the family through it)."""
    model = family_of(cfg).build(cfg, seq_length=seq_length, layers=layers)
    if getattr(model, "config", None) is None:
        raise TypeError(f"{type(model).__name__} (model.family={cfg.family}) must keep its model section as .config")
    return model
