"""Recipes: YAML files that name the model, the data, what trains and how.

The whole recipe is validated (pydantic, unknown keys forbidden) before any work
starts; ``key=value`` overrides use dotted keys (``training.lr=3e-4``).
"""

from __future__ import annotations

import dataclasses
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ..data.text import DataSettings, as_sources
from ..errors import UpcycleError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # upcycle/recipes/*.yaml, shipped as package data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan anywhere: one line naming the key


Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam beta: in [0, 1)


def convert_methods() -> tuple[str, ...]:
    """The methods a recipe may convert with: those whose output is a causal LM to tune (``MethodSpec.tunes``)."""
    from ..methods import all_specs

    return tuple(spec.name for spec in all_specs() if spec.tunes)


@lru_cache(maxsize=None)
def convert_section(method: str) -> type[BaseModel]:
    """The recipe's ``convert:`` section of ``method``: ``method`` plus every field of the method's ``Options``
    dataclass (the flags of ``upcycle convert``, same names with ``_``), with the same defaults."""
    from ..methods import method_spec

    options = method_spec(method).options
    hints = typing.get_type_hints(options)
    fields = {
        f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(options)
    }
    return create_model(
        f"{options.__name__}Section",
        __base__=_Section,
        __doc__=f"Convert ``model`` with {method} first.",
        method=(Literal[method], ...),
        **fields,
    )


def validate_convert(tree: dict) -> BaseModel:
    """Validate a ``convert:`` mapping against its method's section; errors are located under ``convert``."""
    method = tree.get("method") if isinstance(tree, dict) else None
    if method not in convert_methods():
        raise UpcycleError(
            f"recipe key 'convert.method' must be one of {', '.join(convert_methods())} (got {method!r}); "
            "set it in the recipe or pass convert.method=NAME"
        )
    from ..methods import method_spec

    if isinstance(tree.get("calibration"), str):  # one text, as older recipes spell it: a mix of one
        tree = tree | {"calibration": [tree["calibration"]]}
    given = {key for key, value in tree.items() if value not in (None, [])}
    for name, required in method_spec(method).missing_requirements(given):
        raise UpcycleError(
            f"recipe key 'convert.{name}' applies only with convert.{required}; set convert.{required} too, or "
            f"drop convert.{name}"
        )
    try:
        return convert_section(method).model_validate(tree)
    except ValidationError as error:
        raise UpcycleError(_error_line(error, prefix=("convert",))) from None


DataSection = DataSettings  # the data: section: one schema with upcycle.data.corpus.DataConfig (its defaults, checks)


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LossSection(_Section):
    lm: float = Field(1.0, ge=0)  # weight of the next-token cross-entropy on the data
    distill: float = Field(0.0, ge=0)  # weight of KL(teacher || student) over the vocabulary, per token
    distill_temperature: float = Field(1.0, gt=0)  # both distributions softened by T; the KL is scaled by T^2
    distill_hidden: float = Field(0.0, ge=0)  # weight of matching per-layer states to the teacher's
    distill_hidden_on: Literal["hidden_states", "attention_outputs"] = "hidden_states"
    distill_chunk_tokens: int | None = Field(
        None, gt=0
    )  # positions per KL chunk; None: a 64 MiB fp32 [tokens, vocab] chunk
    load_balance: float = Field(0.01, ge=0)
    z_loss: float = Field(0.001, ge=0)

    @model_validator(mode="after")
    def _some_objective(self) -> LossSection:
        if self.lm == 0 and self.distill == 0 and self.distill_hidden == 0:
            raise ValueError(
                "losses.lm, losses.distill and losses.distill_hidden are all 0, so nothing would train; "
                "give one a weight"
            )
        return self


class TrainingSection(_Section):
    steps: int = Field(gt=0)
    global_batch_tokens: int = Field(gt=0)
    micro_batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the student (inductor) through accelerate; the first steps compile
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0)
    log_every: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _lr_order(self) -> TrainingSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class Recipe(_Section):
    """A fine-tuning recipe for causal LMs (the bundled ones: upcycle/recipes/*.yaml); CLIP recipes are
    :class:`ClipRecipe`."""

    type: Literal["causal-lm"] = "causal-lm"
    description: str = ""
    model: str
    output: str
    convert: Any = None  # a method's convert section (validate_convert), or None
    teacher: str | None = (
        None  # "source" (the model converted from), a folder or a Hub id: frozen, for losses.distill*
    )
    compare: str | None = (
        None  # evaluated beside the tuned model at the end ("source", a folder or a Hub id); default: teacher
    )
    data: DataSection
    trainable: Literal["all", "routers", "lora"] = "all"
    lora: LoraSection = LoraSection()
    losses: LossSection = LossSection()
    training: TrainingSection
    attention: Literal["auto", "kernel", "torch", "masked"] = (
        "auto"  # head-gated attention; auto: the Triton kernel on CUDA, else masked
    )
    trust_remote_code: bool = (
        False  # tune model/teacher/compare folders whose auto_map names code of their own (never run nor copied)
    )
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _teacher_for_distillation(self) -> Recipe:
        distills = self.losses.distill > 0 or self.losses.distill_hidden > 0
        if distills and not self.teacher:
            raise ValueError(
                "losses.distill and losses.distill_hidden need a teacher; "
                "set teacher: source (the model converted from), a folder or a Hub id"
            )
        if self.teacher and not distills:
            raise ValueError(
                "teacher is set but losses.distill and losses.distill_hidden are 0; "
                "give one a weight, or use compare: for evaluation only"
            )
        if self.convert is not None:
            if self.trust_remote_code and isinstance(self.convert, dict):
                self.convert.setdefault("trust_remote_code", True)
            self.convert = validate_convert(self.convert)
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> Recipe:
        """A step's tokens must be whole micro-batches of whole sequences (the process count is checked at launch)."""
        seq_len, training = self.data.seq_len, self.training
        per_micro_batch = training.micro_batch_size * seq_len
        if training.global_batch_tokens % per_micro_batch:
            raise ValueError(
                f"training.global_batch_tokens {training.global_batch_tokens} is not a multiple of "
                "training.micro_batch_size "
                f"x data.seq_len = {training.micro_batch_size} x {seq_len} = {per_micro_batch}; make it one"
            )
        return self

    @model_validator(mode="after")
    def _validation_text(self) -> Recipe:
        """finetune scores the model before and after tuning on validation text (the report, the card, eval.json),
        so a recipe must leave it some: refused here, before any work, rather than after training."""
        data = self.data
        if data.validation_tokens == 0:
            raise UpcycleError(
                "recipe key 'data.validation_tokens' is 0, which leaves no validation text, but finetune scores the "
                f"model on it before and after tuning; set it to at least one block ({data.seq_len} tokens, "
                "data.seq_len) or leave it out for the default"
            )
        if not data.validation_sources() and data.validation_fraction == 0:
            raise UpcycleError(
                "recipe key 'data.validation_fraction' is 0 and there is no data.validation, which leaves no "
                "validation text, but finetune scores the model on it before and after tuning; give data.validation "
                "(held-out files) or set data.validation_fraction above 0"
            )
        return self

    def reference(self) -> str | None:
        """The model the tuned one is compared with at the end: ``compare``, else the teacher."""
        return self.compare or self.teacher


class ClipDataSection(_Section):
    train: str
    validation: str | None = None
    max_length: int = Field(77, ge=2)


class MCLSection(_Section):
    """Multistage Contrastive Learning (CLIP-MoE): one FFN-only stage per new expert."""

    stages: int = Field(3, ge=1)
    clusters: int = Field(3, ge=2)  # k-means clusters per modality; the joint label has clusters^2 values


class ClipLossSection(_Section):
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    load_balance: float = Field(0.01, ge=0)


class ClipTrainingSection(_Section):
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=2)  # pairs per optimizer step, across processes
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.2, ge=0)
    adam_betas: tuple[Beta, Beta] = (0.9, 0.98)
    grad_clip: float = Field(1.0, gt=0)
    logit_scale_init: float | None = 4.605170185988092  # log 100; None keeps the model's
    seed: int = 0
    log_every: int = Field(10, gt=0)


class ClipRecipe(_Section):
    """A CLIP recipe: ``type: clip`` (contrastive tuning of ``trainable``) or ``type: clip-mcl`` (CLIP-MoE expert
    stages)."""

    type: Literal["clip", "clip-mcl"]
    description: str = ""
    model: str
    output: str
    data: ClipDataSection
    trainable: Literal["all", "ffn", "routers"] = "all"
    mcl: MCLSection = MCLSection()
    losses: ClipLossSection = ClipLossSection()
    training: ClipTrainingSection = ClipTrainingSection()
    trust_remote_code: bool = False  # tune a model folder whose auto_map names code of its own (never run nor copied)
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _mcl_trains_ffns(self) -> ClipRecipe:
        if self.type == "clip-mcl" and self.trainable != "ffn":
            raise ValueError(f"a clip-mcl recipe trains the FFNs only (trainable: ffn), not {self.trainable}")
        return self


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UpcycleError(f"override {key}: {part} is not a section; use key=value with an existing section")
        node = child
    node[parts[-1]] = value


def _error_line(error: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    first = error.errors()[0]
    loc = [*prefix, *(str(part) for part in first["loc"])]
    if len(loc) > 2 and loc[0] == "data" and loc[1] in ("train", "validation") and loc[2] in ("str", "list[str]"):
        del loc[2:]  # the union member tried, not a key of the recipe
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        return (
            f"recipe key {key!r} is unknown; "
            "check its spelling against the README's recipe keys or `upcycle finetune --help`"
        )
    if first["type"] == "missing":
        return f"recipe key {key!r} is required; add it to the recipe or pass {key}=VALUE"
    if first["type"] == "value_error":  # a check across keys (model validators)
        message = first["msg"].removeprefix("Value error, ")
        return f"recipe{f' key {key!r}' if loc else ''}: {message}; fix the recipe"
    given = first.get("input")
    return f"recipe key {key!r}: {first['msg'].lower()} (got {given!r}); fix it in the recipe or pass {key}=VALUE"


def resolve_recipe_path(name: str) -> Path:
    """A recipe file, or the name of a bundled one (``smollm2-moh-cpu``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    raise UpcycleError(f"recipe {name} does not exist; pass a YAML file or a bundled name from `upcycle recipes`")


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe | ClipRecipe:
    """Read, override and validate a recipe; every problem is one UpcycleError line."""
    path = resolve_recipe_path(name)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UpcycleError(
            f"cannot read recipe {path} ({error.strerror or error}); give a readable YAML file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UpcycleError(
            f"recipe {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start} is invalid); "
            "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UpcycleError(f"recipe {path} is not valid YAML ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(tree, dict):
        raise UpcycleError(f"recipe {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UpcycleError(f"override {item!r} is not key=value; write e.g. training.lr=3e-4")
        _set_dotted(tree, key.strip(), yaml.safe_load(text))
    try:
        recipe = (
            ClipRecipe.model_validate(tree)
            if str(tree.get("type", "")).startswith("clip")
            else Recipe.model_validate(tree)
        )
    except ValidationError as error:
        raise UpcycleError(_error_line(error)) from None
    check_files(recipe)
    return recipe


def _is_local_reference(value: str) -> bool:
    return not value.startswith("asset:") and (
        value.count("/") != 1 or Path(value).exists() or value.startswith((".", "/", "~"))
    )


def convert_inputs(recipe, indexed: bool = True) -> list[tuple[str, str]]:
    """(recipe key, value) of every input the recipe's ``convert:`` section names: the values of its method's
    options that have an input role (``option(role=...)``: calibration texts, experts, input files); with
    ``indexed``, each value of a list of several has its own key (``convert.calibration[1]``)."""
    section = getattr(recipe, "convert", None)
    if section is None:
        return []
    from ..methods import method_spec
    from ..methods.spec import role_values

    options = method_spec(section.method).options(**section.model_dump(exclude={"method"}))
    inputs = []
    for name, values in role_values(options).items():
        inputs += [
            (f"convert.{name}[{i}]" if indexed and len(values) > 1 else f"convert.{name}", v)
            for i, v in enumerate(values)
        ]
    return inputs


def check_files(recipe: Recipe) -> None:
    """Every local file a recipe names must exist (assets and Hub names are checked when used)."""
    checks = [("model", recipe.model), ("accelerate_config", recipe.accelerate_config)]
    if isinstance(recipe, Recipe):
        checks += [("data.train", source) for source in as_sources(recipe.data.train)]
        checks += [("data.validation", source) for source in as_sources(recipe.data.validation)]
        checks += [
            (key, value)
            for key, value in (("teacher", recipe.teacher), ("compare", recipe.compare))
            if value != "source"
        ]
    else:
        checks += [("data.train", recipe.data.train), ("data.validation", recipe.data.validation)]
    checks += convert_inputs(recipe, indexed=False)
    for key, value in checks:
        if value and _is_local_reference(value) and not Path(value).expanduser().exists():
            raise UpcycleError(f"recipe key {key!r}: {value} does not exist; fix the path or pass {key}=PATH")


def bundled_recipes() -> list[tuple[str, str]]:
    """(name, description) of every bundled recipe (upcycle/recipes/*.yaml)."""
    found = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        tree = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml
        found.append(
            (path.stem, str(tree.get("description", "")).strip().splitlines()[0] if tree.get("description") else "")
        )
    return found
