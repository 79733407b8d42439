"""The ``upcycle`` command: parse, call the library, print. User mistakes end in one line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from .errors import UpcycleError

app = typer.Typer(
    help="Rewrite dense Hugging Face checkpoints (LLaMA family) into more efficient or capable forms.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")


def _run(action: Callable[[], T], interrupted: str = "nothing was written") -> T:
    """Run a command body; an UpcycleError or Ctrl-C becomes one line on stderr and a non-zero exit (``interrupted``:
    what a Ctrl-C leaves behind)."""
    try:
        return action()
    except UpcycleError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {interrupted}", err=True)
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"upcycle {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Rewrite dense Hugging Face checkpoints (LLaMA family) into more efficient or capable forms."""


class Method(str, Enum):
    moh = "moh"
    prune_heads = "prune-heads"
    gqa = "gqa"
    mhe = "mhe"
    bam = "bam"
    clip_moe = "clip-moe"


class Router(str, Enum):
    query_norm = "query-norm"
    learned = "learned"
    fitted = "fitted"


class Rescale(str, Enum):
    none = "none"
    layer = "layer"
    channel = "channel"


class Importance(str, Enum):
    gradient = "gradient"
    random = "random"


class Normalize(str, Enum):
    auto = "auto"
    layer = "layer"
    none = "none"


class Refit(str, Enum):
    none = "none"
    rescale = "rescale"
    lstsq = "lstsq"


class Variant(str, Enum):
    mul = "mul"
    add = "add"


class Init(str, Enum):
    svd = "svd"
    calibrated = "calibrated"
    sequential = "sequential"


class AttentionMix(str, Enum):
    expert_kv = "expert-kv"
    shared_kv = "shared-kv"
    average = "average"


class RouterInit(str, Enum):
    random = "random"
    zero = "zero"


class AttentionBackend(str, Enum):
    auto = "auto"
    kernel = "kernel"
    torch = "torch"
    masked = "masked"


class SharedSelection(str, Enum):
    first = "first"
    weight_norm = "weight-norm"
    contribution = "contribution"


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Dense checkpoint: a local folder (safetensors or .bin) or a Hub model id.")],
    out: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
    method: Annotated[Method, typer.Option(help="Conversion method.")] = Method.moh,
    router: Annotated[Router, typer.Option(rich_help_panel="MoH", help="MoH router: query-norm (parameter-free, MoH-LLaMA3), learned (two-stage, zero-initialised) or fitted (a linear scorer fitted on --calibration text to pick the heads that contribute most; binary gates).")] = Router.query_norm,
    shared_heads: Annotated[str, typer.Option(rich_help_panel="MoH", help="MoH: query heads always on, as a fraction (0.5) or a count (4).")] = "0.5",
    active_heads: Annotated[float, typer.Option(rich_help_panel="MoH", help="MoH: fraction of query heads active per token, in (shared fraction, 1].")] = 0.75,
    shared_selection: Annotated[SharedSelection | None, typer.Option(rich_help_panel="MoH", help="MoH: which heads are shared. Default: contribution with --calibration, else weight-norm.", show_default=False)] = None,
    rescale: Annotated[Rescale, typer.Option(rich_help_panel="MoH", help="MoH: scale o_proj by one factor per layer (layer) or per output channel (channel), fitted layer after layer by least squares so the attention output best matches dense on --calibration text; none keeps o_proj.")] = Rescale.none,
    ratio: Annotated[float | None, typer.Option(rich_help_panel="Head pruning", help="prune-heads: fraction of prunable units removed, 0 <= R < 1 (units: heads for MHA, KV groups for GQA models).", show_default=False)] = None,
    importance: Annotated[Importance, typer.Option(rich_help_panel="Head pruning", help="prune-heads: gradient (E|dL/dgate| per unit on --calibration text) or random (the control, with --seed).")] = Importance.gradient,
    seed: Annotated[int, typer.Option(rich_help_panel="Seeds and calibration data", help="prune-heads: seed of --importance random and of the masked-LM masking; bam, clip-moe: seed of the random routers.")] = 0,
    normalize: Annotated[Normalize, typer.Option(rich_help_panel="Head pruning", help="prune-heads: L2-normalise gradient importance per layer: layer (the paper), none, or auto (layer only with >= 8 units per layer).")] = Normalize.auto,
    iterative: Annotated[int, typer.Option(rich_help_panel="Head pruning", help="prune-heads: prune in N cumulative steps, recomputing importance before each (1: score once).")] = 1,
    min_heads_per_layer: Annotated[int, typer.Option(rich_help_panel="Head pruning", help="prune-heads: query heads every layer keeps at least.")] = 1,
    uniform: Annotated[bool, typer.Option(rich_help_panel="Head pruning", help="prune-heads: remove the same number of units in every layer (decoders: a plain base-architecture checkpoint).")] = False,
    kv_heads: Annotated[int | None, typer.Option(rich_help_panel="GQA", help="gqa: new number of key/value heads, a divisor of the current count (1: MQA).", show_default=False)] = None,
    refit: Annotated[Refit | None, typer.Option(rich_help_panel="Head pruning and GQA", help="prune-heads, gqa: refit each changed layer's o_proj on --calibration text so its attention output matches the dense one: none (default), rescale (per-channel RMS) or lstsq (least squares, sequential).", show_default=False)] = None,
    variant: Annotated[Variant | None, typer.Option(rich_help_panel="MHE", help="mhe: head embeddings multiply (mul, default) or add to the shared projection.", show_default=False)] = None,
    init: Annotated[Init | None, typer.Option(rich_help_panel="MHE", help="mhe: svd (default; best fit on the weights, no data), calibrated (least squares on --calibration activations) or sequential (calibrated, each layer fitted on the already-compressed layers' outputs against the dense model's).", show_default=False)] = None,
    expert: Annotated[list[str] | None, typer.Option(rich_help_panel="BAM / BTX and CLIP-MoE", help="bam: a model branched from SRC (the seed, expert 0) and trained further; clip-moe: an MCL stage checkpoint. Repeat for each expert.", show_default=False)] = None,
    attention: Annotated[AttentionMix | None, typer.Option(rich_help_panel="BAM / BTX", help="bam: expert-kv (default; per-expert Q, K, V, O), shared-kv (per-expert Q, O; K, V averaged) or average (BTX).", show_default=False)] = None,
    ffn_top_k: Annotated[int | None, typer.Option(rich_help_panel="BAM / BTX", help="bam: FFN experts per token (default 1; 2 with --attention average, as in BTX).", show_default=False)] = None,
    router_init: Annotated[RouterInit | None, typer.Option(rich_help_panel="BAM / BTX", help="bam: random (default, the paper; normal with the model's initializer_range, --seed) or zero (uniform mixture at first).", show_default=False)] = None,
    parallel_block: Annotated[bool, typer.Option("--parallel-block", rich_help_panel="BAM / BTX", help="bam: parallel attention+FFN blocks, x + A(LN x) + F(LN x) (changes a sequential seed's function).")] = False,
    layers: Annotated[int | None, typer.Option(rich_help_panel="CLIP-MoE", help="clip-moe: experts in the last L layers of both towers (default: all).", show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option(rich_help_panel="CLIP-MoE", help="clip-moe: experts per token (default 2).", show_default=False)] = None,
    upcycle_copies: Annotated[int | None, typer.Option(rich_help_panel="CLIP-MoE", help="clip-moe: the sparse-upcycling baseline, E copies of the base FFN (instead of --expert).", show_default=False)] = None,
    calibration: Annotated[Path | None, typer.Option(rich_help_panel="Seeds and calibration data", help="Calibration text (.txt, .jsonl or a folder) for data-driven choices.")] = None,
    calibration_tokens: Annotated[int, typer.Option(rich_help_panel="Seeds and calibration data", help="Tokens of calibration text to use.")] = 16384,
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan, parameters and output size; write nothing.")] = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", rich_help_panel="Publishing", help="Then push OUT to this Hub repository (owner/name; created when missing). The token is checked before converting.", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", rich_help_panel="Publishing", help="With --push-to-hub: create the repository private.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Convert SRC (and experts) although the auto_map of its config.json or tokenizer_config.json names code of its own; that code is never run nor copied into OUT.")] = False,
) -> None:
    """Convert a dense checkpoint. Example: upcycle convert ./SmolLM2-135M ./smollm2-moh --active-heads 0.75

    Head pruning: upcycle convert SRC OUT --method prune-heads --ratio 0.25 --calibration text.txt [--uniform].
    MHA to GQA/MQA: upcycle convert SRC OUT --method gqa --kv-heads 1 [--refit lstsq --calibration text.txt]
    MHE: upcycle convert SRC OUT --method mhe --variant mul --init calibrated --calibration text.txt
    BAM: upcycle convert SEED OUT --method bam --expert ./code-branch --expert ./law-branch --attention expert-kv
    CLIP-MoE: upcycle convert ./clip ./clip-moe --method clip-moe --expert ./mcl/stage-1 --expert ./mcl/stage-2 --expert ./mcl/stage-3
    """
    from .convert import convert_checkpoint

    def options():
        for flag, value, example in (("--active-heads", active_heads, "0.75"), ("--ratio", ratio, "0.25")):
            if value is not None and not math.isfinite(value):
                raise UpcycleError(f"{flag} {value} is not a finite number; give a fraction like {example}")
        if method is not Method.prune_heads and ratio is not None:
            raise UpcycleError(f"--ratio applies to --method prune-heads, not {method.value}; drop it or pass --method prune-heads")
        if method is not Method.gqa and kv_heads is not None:
            raise UpcycleError(f"--kv-heads applies to --method gqa, not {method.value}; drop it or pass --method gqa")
        if method is not Method.mhe and (variant or init):
            raise UpcycleError(f"--{'variant' if variant else 'init'} applies to --method mhe, not {method.value}; drop it or pass --method mhe")
        owners = {"--refit": (Method.prune_heads, Method.gqa), "--expert": (Method.bam, Method.clip_moe), "--attention": (Method.bam,), "--ffn-top-k": (Method.bam,),
                  "--router-init": (Method.bam,), "--parallel-block": (Method.bam,), "--layers": (Method.clip_moe,),
                  "--top-k": (Method.clip_moe,), "--upcycle-copies": (Method.clip_moe,)}
        values = {"--refit": refit, "--expert": expert, "--attention": attention, "--ffn-top-k": ffn_top_k, "--router-init": router_init,
                  "--parallel-block": parallel_block, "--layers": layers, "--top-k": top_k, "--upcycle-copies": upcycle_copies}
        for flag, value in values.items():
            if value not in (None, False, []) and method not in owners[flag]:
                allowed = " or ".join(f"--method {m.value}" for m in owners[flag])
                raise UpcycleError(f"{flag} applies to {allowed}, not {method.value}; drop it or pass {allowed}")
        if method is Method.clip_moe:
            from .methods.clip_moe import ClipMoEOptions

            return ClipMoEOptions(experts=list(expert or []), layers=layers, top_k=2 if top_k is None else top_k,
                                  upcycle_copies=upcycle_copies, seed=seed)
        if method is Method.bam:
            from .methods.bam import BAMOptions

            return BAMOptions(experts=list(expert or []), attention=(attention or AttentionMix.expert_kv).value, ffn_top_k=ffn_top_k,
                              router_init=(router_init or RouterInit.random).value, parallel_block=parallel_block, seed=seed)
        if method is Method.mhe:
            from .methods.mhe import MHEOptions

            return MHEOptions(variant=(variant or Variant.mul).value, init=(init or Init.svd).value, calibration=calibration,
                              calibration_tokens=calibration_tokens)
        if method is Method.prune_heads:
            from .methods.prune_heads import PruneHeadsOptions

            return PruneHeadsOptions(ratio=ratio, importance=importance.value, seed=seed, iterative=iterative, normalize=normalize.value, min_heads_per_layer=min_heads_per_layer,
                                     uniform=uniform, calibration=calibration, calibration_tokens=calibration_tokens, refit=(refit or Refit.none).value)
        if method is Method.gqa:
            from .methods.gqa import GQAOptions

            return GQAOptions(kv_heads=kv_heads, refit=(refit or Refit.none).value, calibration=calibration, calibration_tokens=calibration_tokens)
        from .methods.moh import MoHOptions

        return MoHOptions(router=router.value, shared_heads=shared_heads, active_heads=active_heads,
                          shared_selection=shared_selection.value if shared_selection else None,
                          calibration=calibration, calibration_tokens=calibration_tokens, rescale=rescale.value)

    def go():
        settings = options()
        settings.trust_remote_code = trust_remote_code
        if push_to_hub and not dry_run:
            from .convert import source_hub_id

            if source_hub_id(src) is None:
                raise UpcycleError(f"--push-to-hub needs the Hub id of {src} for the card's base_model, and a local folder does not say it; "
                                   "pass SRC as its Hub id (owner/name; a downloaded model is read from the cache), or convert without "
                                   "--push-to-hub, then run `upcycle card OUT --base-model OWNER/NAME` and `upcycle push OUT REPO_ID`")
        target = _push_target(push_to_hub, private, connect=not dry_run)
        convert_checkpoint(src, out, method.value, settings, shard_size=shard_size, overwrite=overwrite, dry_run=dry_run,
                           card_name=target.repo_id if target else None)
        if target:
            from .checkpoint.hub import push_folder

            written.append(out)
            push_folder(out, target.repo_id, private=private, target=target)

    def terminable():
        """SIGTERM (a job scheduler, `kill`) cleans up like Ctrl-C, then exits 143 with one line."""
        from .checkpoint.writer import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                go()
        except Terminated:
            done = f"{out} was written, the push to {push_to_hub} did not finish" if written else "nothing was written"
            typer.echo(f"terminated (SIGTERM): {done}", err=True)
            raise typer.Exit(143) from None

    written: list[Path] = []
    _run(terminable)


def _push_target(repo_id: str | None, private: bool, *, connect: bool = True):
    """Check --private and, when ``connect``, the token and the repository id of --push-to-hub before the long work starts."""
    if repo_id is None and private:
        raise UpcycleError("--private applies to --push-to-hub; add --push-to-hub OWNER/NAME or drop --private")
    if repo_id is None or not connect:
        return None
    from .checkpoint.hub import prepare_push

    return prepare_push(repo_id)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint folder (dense or converted) or a Hub model id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show family, layers, heads, KV heads, head width, parameters, dtypes, shards, and the plan of converted models."""
    from .inspect_model import describe, format_description

    info = _run(lambda: describe(path))
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@app.command()
def finetune(
    recipe: Annotated[str, typer.Argument(help="A recipe YAML file, or the name of a bundled one (see `upcycle recipes`).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides with dotted keys, e.g. training.steps=20 training.lr=3e-4.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in the recipe's output folder.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many steps in this run (checkpointed; continue with --resume).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder (one holding only what finetune writes; never an input's folder).")] = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Then push OUTPUT/final (a clip-mcl recipe: its last stage) to this Hub repository. The token is checked before training.", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repository private.")] = False,
) -> None:
    """Continue-tune a model with a recipe. Example: upcycle finetune smollm2-moh-cpu training.steps=20

    CLIP recipes (type: clip or clip-mcl): upcycle finetune clip-mcl model=./clip data.train=pairs.jsonl output=runs/mcl

    Several processes: accelerate launch --multi_gpu --num_processes 2 -m upcycle finetune RECIPE
    """
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
                raise UpcycleError(f"--resume and --stop-after apply to causal-LM recipes, not type {loaded.type}; drop them")
            from .train.clip import run_clip_recipe

            final = run_clip_recipe(loaded, overwrite=overwrite)
        else:
            final = run_finetune(loaded, resume=resume, stop_after=stop_after, overwrite=overwrite)
        if target and final is None:
            typer.echo(f"stopped before the end: nothing pushed to {target.repo_id}")
        elif target:
            from .checkpoint.card import write_card
            from .checkpoint.hub import push_folder

            write_card(final, name=target.repo_id)
            push_folder(final, target.repo_id, private=private, target=target)

    def interruptible():
        """Ctrl-C or SIGTERM: one line saying what the output folder keeps and the command that continues."""
        from .checkpoint.writer import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                go()
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            from .train.loop import process_state

            state = process_state()
            if state.is_main_process:
                command = ["upcycle", "finetune", recipe, *(overrides or []), *(["--push-to-hub", push_to_hub] if push_to_hub else []),
                           *(["--private"] if private else [])]
                line = interruption_report(loaded, command, signal_name="terminated (SIGTERM)" if terminated else "interrupted")
                typer.echo(line + (" (under the same accelerate launch)" if state.num_processes > 1 and "with:" in line else ""), err=True)
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
    name: Annotated[str | None, typer.Option(help="The model's name in the card, e.g. the Hub repo id it will have (remembered for later refreshes).", show_default=False)] = None,
    base_model: Annotated[list[str] | None, typer.Option("--base-model", help="The Hub id (owner/name) of the base model, when it was converted from a local folder; repeat for each expert of a BAM or CLIP-MoE model, seed first (remembered).", show_default=False)] = None,
) -> None:
    """Rewrite PATH/README.md from the folder's config.json, upcycle_report.json and eval.json (after your own evaluation).

    Example: upcycle eval ./smollm2-moh --data heldout.txt --json ./smollm2-moh/eval.json && upcycle card ./smollm2-moh
    """
    from .checkpoint.card import write_card

    written = _run(lambda: write_card(path, name=name, base_models=base_model))
    typer.echo(f"wrote {written}")


@app.command()
def push(
    path: Annotated[Path, typer.Argument(help="The folder to publish (validated first).")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, owner/name (or name, in your namespace); created when missing.")],
    private: Annotated[bool, typer.Option(help="Create the repository private (an existing public one is refused).")] = False,
    revision: Annotated[str | None, typer.Option(help="Push to this branch (created from main when missing).", show_default=False)] = None,
    commit_message: Annotated[str | None, typer.Option(help="The commit message.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="List what would be uploaded, with sizes; upload nothing (no token needed).")] = False,
) -> None:
    """Validate PATH and upload it to the Hugging Face Hub. Example: upcycle push ./smollm2-moh me/smollm2-moh --private

    The token comes from HF_TOKEN or the stored `hf auth login`; HF_ENDPOINT selects another Hub endpoint.
    """
    from .checkpoint.hub import push_folder

    _run(lambda: push_folder(path, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run),
         interrupted="nothing was committed (the upload is one commit; the repository or branch may have been created, empty "
                     "or unchanged); run the same command again to push")


@app.command(name="eval")
def evaluate_command(
    path: Annotated[str, typer.Argument(help="A model folder (dense, converted or tuned).")],
    data: Annotated[list[str], typer.Option(help="Held-out text: .txt (blank-line separated documents), .jsonl, a folder of them, or a text asset (asset:kjv-heldout, asset:python-heldout). Repeat for several corpora.")],
    compare: Annotated[str | None, typer.Option(help="A model scored on the same tokens, with the ratio of the perplexities per corpus; `source`: the dense model PATH was converted from (its upcycle_report.json).", show_default=False)] = None,
    tokens: Annotated[int, typer.Option(help="Tokens of each --data corpus to score.")] = 32768,
    window: Annotated[int | None, typer.Option(help="Context window of the sliding-window perplexity, at most the model's max_position_embeddings. Default: 512, or max_position_embeddings when smaller.", show_default=False)] = None,
    stride: Annotated[int | None, typer.Option(help="Stride of the sliding window (default: the window, i.e. disjoint blocks).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--json", help="Also write the results (and the recovery with --compare) as JSON to this file.", show_default=False)] = None,
    attention: Annotated[AttentionBackend, typer.Option(help="Head-gated attention: kernel (Triton, only the selected heads; CUDA), torch (only the selected heads, plain torch), masked (all heads times the gates; the reference), auto (kernel on CUDA with Triton, else masked).")] = AttentionBackend.auto,
) -> None:
    """Perplexity per corpus (exact token counts), recovery against --compare, tokens/s and head usage. Example: upcycle eval ./smollm2-moh --data asset:kjv-heldout --data asset:python-heldout --compare source"""
    from .eval.cli import run_eval

    _run(lambda: run_eval(path, data, compare=compare, tokens=tokens, window=window, stride=stride, output=output, attention=attention.value))


def main(args: list[str] | None = None) -> int:
    """Entry point: click's usage errors (unknown option, bad choice) become one ``error:`` line too."""
    try:
        from typer._click import exceptions as click_errors  # typer >= 0.24 carries its own click
    except ImportError:
        from click import exceptions as click_errors

    try:
        return app(args=args, prog_name="upcycle", standalone_mode=False) or 0
    except click_errors.NoArgsIsHelpError as error:
        typer.echo(error.ctx.get_help())
        return 0
    except click_errors.UsageError as error:
        command = error.ctx.command_path if error.ctx else "upcycle"
        message = " ".join(error.format_message().replace("Value error, ", "").split()).rstrip(".")
        typer.echo(f"error: {message}; see `{command} --help`", err=True)
        return 2
    except click_errors.ClickException as error:
        typer.echo(f"error: {' '.join(error.format_message().split())}", err=True)
        return error.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted: nothing was written", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
