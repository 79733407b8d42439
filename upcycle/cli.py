"""The ``upcycle`` command: parse, call the library, print. User mistakes end in one line."""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from .errors import UpcycleError

SUMMARY = (
    "Rewrite dense Hugging Face checkpoints (LLaMA-family decoders, BERT encoders, CLIP) "
    "into more efficient or capable forms."
)
app = typer.Typer(
    help=SUMMARY,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")
_EXIT_AT_ONCE: list[bool] = []  # set by a command that finished with nothing left to clean up (see run)
_INTERRUPTION_SAID: list[bool] = []  # set once an interruption's one line was printed (see main)


def _interruption(line: str, code: int) -> typer.Exit:
    """Print the one line of a Ctrl-C (exit 130) or SIGTERM (143) and give the exit to raise."""
    typer.echo(line, err=True)
    _INTERRUPTION_SAID.append(True)
    return typer.Exit(code)


def _run(action: Callable[[], T], interrupted: str = "nothing was written") -> T:
    """Run a command body; an UpcycleError, Ctrl-C or SIGTERM becomes one line on stderr and exit 1, 130 or 143
    (``interrupted``: what an interruption leaves behind). SIGTERM unwinds like Ctrl-C, so every clean-up runs."""
    from .interrupts import Terminated, signals_so_far, sigterm_as_interrupt
    from .modeling.plan import PlanError

    before = signals_so_far()
    try:
        with sigterm_as_interrupt():
            return action()
    except typer.Exit:
        raise
    except Terminated:
        raise _interruption(f"terminated (SIGTERM): {interrupted}", 143) from None
    except KeyboardInterrupt:
        raise _interruption(f"interrupted: {interrupted}", 130) from None
    except Exception as error:
        interruption = _after_a_signal(interrupted, before)  # a library turned the interrupt into an error of its own
        if interruption is not None:
            raise interruption from None
        if isinstance(error, (UpcycleError, PlanError)):  # PlanError: a checkpoint's plan this runtime does not know
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        raise


def _after_a_signal(interrupted: str, since: int) -> typer.Exit | None:
    """The interruption to report when SIGINT or SIGTERM arrived after the first ``since`` signals (None when none
    did)."""
    import signal

    from .interrupts import signal_received

    received = signal_received(since)
    if received is None:
        return None
    if received == signal.SIGTERM:
        return _interruption(f"terminated (SIGTERM): {interrupted}", 143)
    return _interruption(f"interrupted: {interrupted}", 130)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"upcycle {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    return None  # the summary of `upcycle --help` is SUMMARY, the Typer's help


class AttentionBackend(str, Enum):
    auto = "auto"
    kernel = "kernel"
    torch = "torch"
    masked = "masked"


class ConvertCommand:
    """``upcycle convert``: the common flags below plus every method's own, derived from the methods' specs
    (``methods/<method>.py``'s ``SPEC``) each time the command line is built, so a method registered later has its
    flags, its ``--help`` group and the check that they go with ``--method`` like any other."""

    __name__ = "convert"

    @staticmethod
    def common(
        src: Annotated[
            str, typer.Argument(help="Dense checkpoint: a local folder (safetensors or .bin) or a Hub model id.")
        ],
        out: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
        shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB or 500MB.")] = "5GB",
        overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
        dry_run: Annotated[
            bool, typer.Option(help="Print the plan, parameters and output size; write nothing.")
        ] = False,
        push_to_hub: Annotated[
            str | None,
            typer.Option(
                "--push-to-hub",
                rich_help_panel="Publishing",
                help="Then push OUT to this Hub repository (owner/name; created when missing). "
                "The token is checked before converting.",
                show_default=False,
            ),
        ] = None,
        private: Annotated[
            bool,
            typer.Option(
                "--private", rich_help_panel="Publishing", help="With --push-to-hub: create the repository private."
            ),
        ] = False,
        trust_remote_code: Annotated[
            bool,
            typer.Option(
                "--trust-remote-code",
                help="Convert SRC (and experts) although the auto_map of its config.json or tokenizer_config.json "
                "names code of its own; that code is never run nor copied into OUT.",
            ),
        ] = False,
    ) -> None:
        """The flags every method has (the signature typer reads; the call goes to ``__call__``)."""

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        from .methods import all_specs

        specs = all_specs()
        lines = [f"{spec.name}: {spec.example}" for spec in specs]
        return (
            f"Convert a dense checkpoint. Example: {specs[0].example}\n\n"
            + "\n\n".join(lines[1:])
            + "\n\nMethods: "
            + "; ".join(f"{spec.name}: {spec.summary.rstrip('.')}" for spec in specs)
            + "."
        )

    @property
    def __signature__(self) -> pyinspect.Signature:
        common = list(pyinspect.signature(self.common, eval_str=True).parameters.values())
        return pyinspect.Signature(
            [
                pyinspect.Parameter("ctx", pyinspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
                *(parameter.replace(kind=pyinspect.Parameter.KEYWORD_ONLY) for parameter in common[:2]),
                self._method_parameter(),
                *self._flag_parameters(),
                *(parameter.replace(kind=pyinspect.Parameter.KEYWORD_ONLY) for parameter in common[2:]),
            ]
        )

    @property
    def __annotations__(self) -> dict:  # type: ignore[override]
        return {name: parameter.annotation for name, parameter in self.__signature__.parameters.items()}

    @staticmethod
    def _method_parameter() -> pyinspect.Parameter:
        from .methods import method_names

        names = method_names()
        choice = Enum("Method", {name: name for name in names}, type=str)
        return pyinspect.Parameter(
            "method",
            pyinspect.Parameter.KEYWORD_ONLY,
            default=choice(names[0]),
            annotation=Annotated[choice, typer.Option(help="Conversion method.")],
        )

    @staticmethod
    def _flag_parameters() -> list[pyinspect.Parameter]:
        return [
            pyinspect.Parameter(
                flag.name, pyinspect.Parameter.KEYWORD_ONLY, default=flag.default, annotation=flag.annotation
            )
            for flag in method_flags().values()
        ]

    def __call__(
        self,
        ctx: typer.Context,
        src: str,
        out: Path,
        method: Enum,
        shard_size: str,
        overwrite: bool,
        dry_run: bool,
        push_to_hub: str | None,
        private: bool,
        trust_remote_code: bool,
        **values,
    ) -> None:
        from .convert import convert_checkpoint
        from .methods import method_spec

        # typer's own click: compare the parameter source by name
        given = {
            name: value
            for name, value in values.items()
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        }

        def go():
            spec = method_spec(method.value)
            settings = method_options(spec, given, method_flags())
            if spec.has_option("trust_remote_code"):
                settings.trust_remote_code = trust_remote_code
            if push_to_hub and not dry_run:
                from .checkpoint.source import source_hub_id

                if source_hub_id(src) is None:
                    raise UpcycleError(
                        f"--push-to-hub needs the Hub id of {src} for the card's base_model, "
                        "and a local folder does not say it; "
                        "pass SRC as its Hub id (owner/name; a downloaded model is read from the cache), "
                        "or convert without "
                        "--push-to-hub, then run `upcycle card OUT --base-model OWNER/NAME` "
                        "and `upcycle push OUT REPO_ID`"
                    )
            target = _push_target(push_to_hub, private, connect=not dry_run)
            convert_checkpoint(
                src,
                out,
                spec.name,
                settings,
                shard_size=shard_size,
                overwrite=overwrite,
                dry_run=dry_run,
                card_name=target.repo_id if target else None,
            )
            if target:
                from .hub import push_folder

                written.append(out)
                push_folder(out, target.repo_id, private=private, target=target)

        def terminable():
            """SIGTERM (a job scheduler, `kill`) cleans up like Ctrl-C, then exits 143 with one line."""
            from .interrupts import Terminated, sigterm_as_interrupt

            try:
                with sigterm_as_interrupt():
                    go()
            except Terminated:
                done = (
                    f"{out} was written, the push to {push_to_hub} did not finish"
                    if written
                    else "nothing was written"
                )
                raise _interruption(f"terminated (SIGTERM): {done}", 143) from None

        written: list[Path] = []
        _run(terminable)
        _EXIT_AT_ONCE.append(True)  # everything is written and closed: nothing left for the interpreter's teardown


@dataclass(frozen=True)
class MethodFlag:
    """One ``upcycle convert`` flag, merged over the methods whose options have the field: ``owners`` are those
    methods, ``annotation`` and ``default`` what typer reads (the default shown is theirs when they agree)."""

    name: str
    flag: str
    owners: tuple[str, ...]
    annotation: object
    default: object
    example: str | None


def method_flags() -> dict[str, MethodFlag]:
    """Every method's flags, by field name, in registry and field order; a field several methods share is one flag
    (help: each method's, grouped where it is the same; panel: theirs, joined)."""
    import dataclasses
    import typing

    from .methods import all_specs
    from .methods.spec import option_flag

    fields: dict[str, list] = {}
    for spec in all_specs():
        hints = typing.get_type_hints(spec.options)
        for name, field in spec.flags().items():
            fields.setdefault(name, []).append((spec, field, hints[name]))
    flags = {}
    for name, entries in fields.items():
        spec, field, hint = entries[0]
        flag = option_flag(spec.options, name)
        helps: dict[str, list[str]] = {}
        for owner, owner_field, _ in entries:
            helps.setdefault(owner_field.metadata["help"], []).append(owner.name)
        text = " ".join(f"{', '.join(owners)}: {help_text}" for help_text, owners in helps.items())
        panels = list(
            dict.fromkeys(owner_field.metadata.get("panel") or owner.panel for owner, owner_field, _ in entries)
        )
        defaults = {
            repr(
                owner_field.default
                if owner_field.default is not dataclasses.MISSING
                else owner_field.default_factory()
            )
            for _, owner_field, _ in entries
        }
        value_type, choices, repeated = _flag_type(hint)
        shared_default = field.default if len(defaults) == 1 and field.default is not dataclasses.MISSING else None
        if choices:
            value_type = Enum(
                f"{name.title().replace('_', '')}Choice", {choice: choice for choice in choices}, type=str
            )
            shared_default = value_type(shared_default) if shared_default is not None else None
        show = shared_default is not None and shared_default is not False
        option = typer.Option(flag, rich_help_panel=" and ".join(panels), help=text, show_default=show)
        annotation = Annotated[
            (list[value_type] if repeated else value_type) | None if value_type is not bool else bool, option
        ]
        flags[name] = MethodFlag(
            name,
            flag,
            tuple(owner.name for owner, _, _ in entries),
            annotation,
            False if value_type is bool else None if repeated else shared_default,
            field.metadata.get("example"),
        )
    return flags


def _flag_type(hint) -> tuple[type, tuple[str, ...], bool]:
    """(value type, choices of a Literal, whether repeated) of an option's type hint (``X | None`` is X)."""
    import types
    import typing

    arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(arguments) == 1:
        hint = arguments[0]
    if typing.get_origin(hint) is typing.Literal:
        return str, tuple(typing.get_args(hint)), False
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], (), True
    return hint, (), False


def method_options(spec, given: dict, flags: dict[str, MethodFlag]):
    """The method's options from the flags given on the command line; a flag of another method, or a number that is
    not finite, is one line."""
    for name, value in given.items():
        flag = flags[name]
        if spec.name not in flag.owners:
            allowed = " or ".join(f"--method {owner}" for owner in flag.owners)
            raise UpcycleError(f"{flag.flag} applies to {allowed}, not {spec.name}; drop it or pass {allowed}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UpcycleError(
                f"{flag.flag} {value} is not a finite number; give a fraction like {flag.example or 0.5}"
            )
    for name, required in spec.missing_requirements(set(given)):
        needed = flags[required].flag
        raise UpcycleError(
            f"{flags[name].flag} applies only with {needed}; pass {needed} too, or drop {flags[name].flag}"
        )
    values = {
        name: [getattr(item, "value", item) for item in value]
        if isinstance(value, list)
        else getattr(value, "value", value)
        for name, value in given.items()
    }
    return spec.options(**values)


app.command(name="convert")(ConvertCommand())


def _push_target(repo_id: str | None, private: bool, *, connect: bool = True):
    """Check --private and, when ``connect``, the token and the repository id of --push-to-hub before the long work
    starts."""
    if repo_id is None and private:
        raise UpcycleError("--private applies to --push-to-hub; add --push-to-hub OWNER/NAME or drop --private")
    if repo_id is None:
        return None
    from .hub import check_repo_id, prepare_push

    check_repo_id(repo_id)
    if not connect:
        return None
    return prepare_push(repo_id)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint folder (dense or converted) or a Hub model id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show family, layers, heads, KV heads, head width, parameters, dtypes, shards, and the plan of converted models."""  # noqa: E501
    from .inspect_model import describe, format_description

    info = _run(lambda: describe(path))
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command()
def finetune(
    recipe: Annotated[
        str, typer.Argument(help="A recipe YAML file, or the name of a bundled one (see `upcycle recipes`).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="key=value overrides with dotted keys, e.g. training.steps=20 training.lr=3e-4.", show_default=False
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in the recipe's output folder.")
    ] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many steps in this run (checkpointed; continue with --resume).", show_default=False
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an existing output folder (one holding only what finetune writes; never an input's folder)."
        ),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            help="Then push OUTPUT/final (a clip-mcl recipe: its last stage) to this Hub repository. "
            "The token is checked before training.",
            show_default=False,
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="With --push-to-hub: create the repository private.")
    ] = False,
) -> None:
    """Continue-tune a model with a recipe. Example: upcycle finetune smollm2-moh-cpu training.steps=20

    CLIP recipes (type: clip or clip-mcl): upcycle finetune clip-mcl model=./clip data.train=pairs.jsonl output=runs/mcl

    Several processes: accelerate launch --multi_gpu --num_processes 2 -m upcycle finetune RECIPE
    """  # noqa: E501
    from .train.finetune import interruption_report, run_finetune
    from .train.recipe import load_recipe

    loaded = None

    def go():
        nonlocal loaded
        from .train.loop import process_state

        loaded = load_recipe(recipe, overrides or [])
        main_process = process_state().is_main_process
        target = _push_target(push_to_hub, private, connect=main_process)
        if loaded.type != "causal-lm":
            if resume or stop_after is not None:
                raise UpcycleError(
                    f"--resume and --stop-after apply to causal-LM recipes, not type {loaded.type}; drop them"
                )
            from .train.clip import run_clip_recipe

            final = run_clip_recipe(loaded, overwrite=overwrite)
        else:
            final = run_finetune(loaded, resume=resume, stop_after=stop_after, overwrite=overwrite)
        if target and final is None:
            typer.echo(f"stopped before the end: nothing pushed to {target.repo_id}")
        elif target:
            from .card import write_card
            from .hub import push_folder

            write_card(final, name=target.repo_id)
            push_folder(final, target.repo_id, private=private, target=target)

    def interruptible():
        """Ctrl-C or SIGTERM: one line saying what the output folder keeps and the command that continues."""
        from .interrupts import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                go()
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            from .train.loop import process_state

            state = process_state()
            if state.is_main_process:
                command = [
                    "upcycle",
                    "finetune",
                    recipe,
                    *(overrides or []),
                    *(["--push-to-hub", push_to_hub] if push_to_hub else []),
                    *(["--private"] if private else []),
                ]
                line = interruption_report(
                    loaded, command, signal_name="terminated (SIGTERM)" if terminated else "interrupted"
                )
                line += " (under the same accelerate launch)" if state.num_processes > 1 and "with:" in line else ""
                raise _interruption(line, 143 if terminated else 130) from None
            raise typer.Exit(143 if terminated else 130) from None

    _run(interruptible)


@app.command()
def recipes() -> None:
    """List the bundled recipes (the YAML files shipped in the package: upcycle/recipes/*.yaml)."""
    from .train.recipe import RECIPES_DIR, bundled_recipes

    found = bundled_recipes()
    width = max((len(name) for name, _ in found), default=0)
    for name, description in found:
        typer.echo(f"{name:<{width}}  {description}")
    typer.echo(f"(in {RECIPES_DIR})")


@app.command()
def card(
    path: Annotated[Path, typer.Argument(help="An upcycle output folder (convert or finetune).")],
    name: Annotated[
        str | None,
        typer.Option(
            help="The model's Hub repository id (owner/name or name), its name in the card (remembered for later "
            "refreshes).",
            show_default=False,
        ),
    ] = None,
    base_model: Annotated[
        list[str] | None,
        typer.Option(
            "--base-model",
            help="The Hub id (owner/name) of the base model, when it was converted from a local folder; "
            "repeat for each expert of a BAM or CLIP-MoE model, seed first (remembered).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Rewrite PATH/README.md from the folder's config.json, upcycle_report.json and eval.json (after your own evaluation).

    Example: upcycle eval ./smollm2-moh --data heldout.txt --json ./smollm2-moh/eval.json && upcycle card ./smollm2-moh
    """  # noqa: E501
    from .card import write_card

    written = _run(lambda: write_card(path, name=name, base_models=base_model))
    typer.echo(f"wrote {written}")


@app.command()
def push(
    path: Annotated[Path, typer.Argument(help="The folder to publish (validated first).")],
    repo_id: Annotated[
        str, typer.Argument(help="The Hub repository, owner/name (or name, in your namespace); created when missing.")
    ],
    private: Annotated[
        bool, typer.Option(help="Create the repository private (an existing public one is refused).")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Push to this branch (created from main when missing).", show_default=False)
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="The commit message.", show_default=False)] = None,
    dry_run: Annotated[
        bool, typer.Option(help="List what would be uploaded, with sizes; upload nothing (no token needed).")
    ] = False,
) -> None:
    """Validate PATH and upload it to the Hugging Face Hub. Example: upcycle push ./smollm2-moh me/smollm2-moh --private

    The token comes from HF_TOKEN or the stored `hf auth login`; HF_ENDPOINT selects another Hub endpoint.
    """  # noqa: E501
    from .hub import push_folder

    _run(
        lambda: push_folder(
            path, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run
        ),
        interrupted="the upload stopped before it finished (files a batch had already committed stay; the "
        "repository or branch may have been created); run the same command again to resume it",
    )


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


PERPLEXITY_PANEL = "Perplexity (--data)"
BENCHMARK_PANEL = "Benchmarks (--tasks, lm-evaluation-harness)"


@app.command(name="eval")
def evaluate_command(
    path: Annotated[str, typer.Argument(help="A model folder (dense, converted or tuned).")],
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Held-out text: .txt (blank-line separated documents), .jsonl, a folder of them, "
            "or a text asset (asset:kjv-heldout, asset:python-heldout). Repeat for several corpora.",
            rich_help_panel=PERPLEXITY_PANEL,
            show_default=False,
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            help="lm-evaluation-harness tasks, groups or tags, comma-separated or repeated (hellaswag,arc_easy; "
            "patterns like mmlu_*); kjv_next_verse is bundled and runs offline (`upcycle tasks`). "
            "Needs lm-eval (the lmeval extra of upcycle).",
            rich_help_panel=BENCHMARK_PANEL,
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="A model scored on the same tokens and task items, with the ratio per corpus and task; "
            "`source`: the dense model PATH was converted from (its upcycle_report.json).",
            show_default=False,
        ),
    ] = None,
    tokens: Annotated[
        int, typer.Option(help="Tokens of each --data corpus to score.", rich_help_panel=PERPLEXITY_PANEL)
    ] = 32768,
    window: Annotated[
        int | None,
        typer.Option(
            help="Context window of the sliding-window perplexity, at most the model's max_position_embeddings. "
            "Default: 512, or max_position_embeddings when smaller.",
            show_default=False,
            rich_help_panel=PERPLEXITY_PANEL,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Stride of the sliding window (default: the window, i.e. disjoint blocks).",
            show_default=False,
            rich_help_panel=PERPLEXITY_PANEL,
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(
            help="Few-shot examples per item (default: each task's own, else 0).",
            show_default=False,
            rich_help_panel=BENCHMARK_PANEL,
        ),
    ] = None,
    limit: Annotated[
        str | None,
        typer.Option(
            help="Score only this many items per task (100), or a fraction of them (0.1): for quick checks, "
            "not for reported figures.",
            show_default=False,
            rich_help_panel=BENCHMARK_PANEL,
        ),
    ] = None,
    batch_size: Annotated[
        str,
        typer.Option(
            help="Requests per forward pass: a number, or auto (the largest that fits, found by the harness).",
            rich_help_panel=BENCHMARK_PANEL,
        ),
    ] = "4",
    include_path: Annotated[
        list[Path] | None,
        typer.Option(
            help="A folder of your own lm-eval task YAML files (e.g. local data: dataset_path: json with "
            "dataset_kwargs.data_files). Repeatable.",
            show_default=False,
            rich_help_panel=BENCHMARK_PANEL,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="cpu, cuda, cuda:N or mps (default: cuda when available).", show_default=False),
    ] = None,
    dtype: Annotated[
        Dtype, typer.Option(help="Weights and compute dtype; auto: bfloat16 on CUDA, float32 elsewhere.")
    ] = Dtype.auto,
    output: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the results (perplexities, benchmarks, and the recovery with --compare) as JSON to "
            "this file; `upcycle card` puts them in the model card.",
            show_default=False,
        ),
    ] = None,
    attention: Annotated[
        AttentionBackend,
        typer.Option(
            help="Head-gated attention: kernel (Triton, only the selected heads; CUDA), "
            "torch (only the selected heads, plain torch), masked (all heads times the gates; the reference), "
            "auto (kernel on CUDA with Triton, else masked)."
        ),
    ] = AttentionBackend.auto,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Let task YAML files of --include-path import the Python files their `!function` tags name "
            "(refused otherwise: it runs that code).",
            rich_help_panel=BENCHMARK_PANEL,
        ),
    ] = False,
) -> None:
    """Perplexity per corpus and benchmark accuracy per task, recovery against --compare, speed and head usage.

    Examples: upcycle eval ./smollm2-moh --data asset:kjv-heldout --data asset:python-heldout --compare source

    upcycle eval ./smollm2-moh --tasks kjv_next_verse --compare source --json ./smollm2-moh/eval.json
    """
    from .eval.cli import run_eval
    from .eval.harness import HarnessSettings, parse_limit, parse_task_names

    def go():
        harness = None
        if tasks:
            harness = HarnessSettings(
                tasks=parse_task_names(tasks),
                num_fewshot=num_fewshot,
                limit=parse_limit(limit),
                batch_size=batch_size,
                include_paths=list(include_path or []),
                trust_remote_code=trust_remote_code,
            )
        return run_eval(
            path,
            data,
            compare=compare,
            tokens=tokens,
            window=window,
            stride=stride,
            output=output,
            attention=attention.value,
            harness=harness,
            device=device,
            dtype=dtype.value,
        )

    _run(go)


@app.command()
def tasks() -> None:
    """List the lm-evaluation-harness tasks bundled with upcycle (they run offline) and the folder that holds them.

    Their items are written into the upcycle cache on first use; give that folder to the harness itself as
    lm_eval --include_path FOLDER --tasks kjv_next_verse ...
    """
    from .data.bundled_tasks import bundled_task_folder, bundled_tasks

    folder = _run(bundled_task_folder)
    found = bundled_tasks()
    width = max(len(name) for name in found)
    for name, description in found.items():
        typer.echo(f"{name:<{width}}  {description}")
    typer.echo(f"(in {folder}: lm_eval --include_path {folder} --tasks NAME ...)")


def main(args: list[str] | None = None) -> int:
    """Entry point: click's usage errors (unknown option, bad choice) become one ``error:`` line too, with exit 1 like
    every other error (130 for Ctrl-C, 143 for SIGTERM)."""
    try:
        from typer._click import exceptions as click_errors  # typer >= 0.24 carries its own click
    except ImportError:
        from click import exceptions as click_errors

    from .interrupts import Terminated, signals_so_far, sigterm_as_interrupt

    before, said = signals_so_far(), len(_INTERRUPTION_SAID)
    try:
        with sigterm_as_interrupt():
            code = app(args=args, prog_name="upcycle", standalone_mode=False) or 0
        if code == 130 and len(_INTERRUPTION_SAID) == said:  # typer makes an interrupt outside _run a silent 130
            interruption = _after_a_signal("nothing was written", before)
            return (interruption or _interruption("interrupted: nothing was written", 130)).exit_code
        return code
    except click_errors.NoArgsIsHelpError as error:
        typer.echo(error.ctx.get_help())
        return 0
    except click_errors.UsageError as error:
        command = error.ctx.command_path if error.ctx else "upcycle"
        message = " ".join(error.format_message().replace("Value error, ", "").split()).rstrip(".")
        typer.echo(f"error: {message}; see `{command} --help`", err=True)
        return 1
    except click_errors.ClickException as error:
        typer.echo(f"error: {' '.join(error.format_message().split())}", err=True)
        return error.exit_code
    except Terminated:
        typer.echo("terminated (SIGTERM): nothing was written", err=True)
        return 143
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted: nothing was written", err=True)
        return 130
    except Exception:
        interruption = _after_a_signal("nothing was written", before)  # a signal's error outside any _run
        if interruption is None:
            raise
        return interruption.exit_code


def run() -> None:
    """The ``upcycle`` program: :func:`main`, then, after a conversion, an immediate exit: the interpreter's teardown
    of torch and transformers takes about a second and has nothing left to do (files are closed, output flushed)."""
    code = main()
    if code == 0 and _EXIT_AT_ONCE:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    run()
