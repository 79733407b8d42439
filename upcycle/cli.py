"""The ``upcycle`` command: parse, call the library, print. User mistakes end in one line."""

from __future__ import annotations

import json
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


def _run(action: Callable[[], T]) -> T:
    """Run a command body; an UpcycleError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    try:
        return action()
    except UpcycleError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
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


class Router(str, Enum):
    query_norm = "query-norm"
    learned = "learned"


class SharedSelection(str, Enum):
    first = "first"
    weight_norm = "weight-norm"
    contribution = "contribution"


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Dense checkpoint: a local folder (safetensors or .bin) or a Hub model id.")],
    out: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
    method: Annotated[Method, typer.Option(help="Conversion method.")] = Method.moh,
    router: Annotated[Router, typer.Option(help="MoH router: query-norm (parameter-free, MoH-LLaMA3) or learned (two-stage, zero-initialised).")] = Router.query_norm,
    shared_heads: Annotated[str, typer.Option(help="MoH: query heads always on, as a fraction (0.5) or a count (4).")] = "0.5",
    active_heads: Annotated[float, typer.Option(help="MoH: fraction of query heads active per token, in (shared fraction, 1].")] = 0.75,
    shared_selection: Annotated[SharedSelection | None, typer.Option(help="MoH: which heads are shared. Default: contribution with --calibration, else weight-norm.", show_default=False)] = None,
    calibration: Annotated[Path | None, typer.Option(help="Calibration text (.txt, .jsonl or a folder) for data-driven choices.")] = None,
    calibration_tokens: Annotated[int, typer.Option(help="Tokens of calibration text to use.")] = 16384,
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan, parameters and output size; write nothing.")] = False,
) -> None:
    """Convert a dense checkpoint. Example: upcycle convert ./SmolLM2-135M ./smollm2-moh --active-heads 0.75"""
    from .convert import convert_checkpoint
    from .methods.moh import MoHOptions

    options = MoHOptions(router=router.value, shared_heads=shared_heads, active_heads=active_heads,
                         shared_selection=shared_selection.value if shared_selection else None,
                         calibration=calibration, calibration_tokens=calibration_tokens)
    _run(lambda: convert_checkpoint(src, out, method.value, options, shard_size=shard_size, overwrite=overwrite, dry_run=dry_run))


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint folder (dense or converted) or a Hub model id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show family, layers, heads, KV heads, head width, parameters, dtypes, shards, and the plan of converted models."""
    from .inspect_model import describe, format_description

    info = _run(lambda: describe(path))
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
