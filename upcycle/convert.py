"""The conversion pipeline shared by every method: read, plan, stream, check, write atomically."""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from . import __version__
from .background import in_background
from .card import write_card
from .checkpoint.reader import CheckpointReader
from .checkpoint.source import Source, open_source, source_hub_id, source_license
from .checkpoint.writer import (
    SUPPORT_FILES,
    ShardedWriter,
    atomic_output,
    check_output_location,
    copy_support_files,
    output_parent,
    parse_size,
    recover_output,
)
from .errors import UpcycleError
from .methods import ChunkedTensor, Conversion, SourceTensor, method_spec
from .paths import output_lock, refuse_inputs_inside

if TYPE_CHECKING:
    import torch
else:
    from .lazy import torch

RUNTIME_DIR = Path(__file__).parent / "modeling"


def base_model_ids(source: Source, experts: list[str]) -> list[str]:
    """The Hub ids of the source and of the expert folders (BAM, CLIP-MoE), where known: the card's ``base_model``.
    Each is resolved once; an expert that is the source's own folder reuses the source's id."""
    others = [expert for expert in dict.fromkeys(experts) if expert != str(source.folder)]
    ids = [source.hub_id, *map(source_hub_id, others)]
    return list(dict.fromkeys(i for i in ids if i))


def input_paths(folder: Path, options) -> dict[str, Path | str | None]:
    """Every local path a conversion reads, by flag: SRC and each value of an option with an input role (experts,
    calibration texts, other input files: ``option(role=...)``), what OUT must not hold, since --overwrite deletes
    OUT. Assets and Hub ids among them name no local path and are skipped by the caller's checks."""
    from .methods.spec import option_flag, role_values

    inputs: dict[str, Path | str | None] = {"SRC": folder}
    for name, values in role_values(options).items():
        flag = option_flag(options, name)
        for index, path in enumerate(values):
            inputs[f"{flag} #{index + 1}" if len(values) > 1 else flag] = Path(path).expanduser()
    return inputs


REPORT_NAME = "upcycle_report.json"
# what a conversion writes into OUT (beside the support files and the runtime), and the results `upcycle eval --json`
# and `upcycle card` add to it: what --overwrite may replace
OUTPUT_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "README.md",
    REPORT_NAME,
    "eval.json",
)


def output_entries() -> tuple[str, ...]:
    """Name patterns of every file a conversion writes (the runtime's files by name)."""
    runtime = tuple(sorted(file.name for file in RUNTIME_DIR.glob("*.py") if file.name != "__init__.py"))
    return OUTPUT_FILES + SUPPORT_FILES + runtime


def replace_refusal(path: Path, shown_as: Path, overwrite: bool) -> str | None:
    """Why OUT (``path``, named ``shown_as``) may not be written or replaced; None when it may: OUT is missing, an
    empty folder, or (with ``overwrite``) a folder a conversion wrote that holds nothing else."""
    import fnmatch

    if path.is_symlink():
        return (
            f"OUT {shown_as} is a symbolic link; upcycle writes only real folders: give the folder it points to "
            "(if that is upcycle's output) or another OUT"
        )
    if not path.exists():
        return None
    if not path.is_dir():
        return (
            f"OUT {shown_as} is a file, not a folder upcycle wrote, and --overwrite never replaces one; "
            "remove it yourself or choose another OUT"
        )
    try:
        entries = sorted(entry.name for entry in path.iterdir())
    except OSError as error:
        return f"OUT {shown_as} cannot be read ({error.strerror or error}); choose another OUT"
    if not entries:
        return None
    report = path / REPORT_NAME
    try:
        written = isinstance(json.loads(report.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        written = False
    if not written:
        return (
            f"OUT {shown_as} is a folder upcycle did not write (it has no {REPORT_NAME}); --overwrite replaces "
            "only upcycle's own outputs: choose another OUT, or empty it yourself"
        )
    patterns = output_entries()
    foreign = [
        name
        for name in entries
        if (path / name).is_dir() or not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return (
            f"OUT {shown_as} holds files a conversion does not write ({', '.join(foreign[:3])}{more}), which "
            "--overwrite would delete; move them out of it or choose another OUT"
        )
    if not overwrite:
        return f"OUT {shown_as} already exists; pass --overwrite to replace it"
    return None


def refuse_working_folder(out: Path) -> None:
    """OUT may not be the current folder or a folder above it (it is replaced by a rename)."""
    here, target = Path.cwd().resolve(), Path(out).resolve()
    if target == here or target in here.parents:
        raise UpcycleError(
            f"OUT {out} is the current folder{'' if target == here else ' or holds it'}, which a conversion replaces; "
            "give a new folder, e.g. ./converted"
        )


def output_bytes(conversion: Conversion, folder: Path) -> int:
    """What OUT will take on disk: the tensors, the shard headers, the copied support and runtime files, a few small
    files."""
    tensors = sum(spec.nbytes for spec in conversion.layout)
    support = {path for pattern in SUPPORT_FILES for path in folder.glob(pattern) if path.is_file()}
    runtime = set(RUNTIME_DIR.glob("*.py")) if conversion.uses_runtime else set()
    return tensors + sum(path.stat().st_size for path in support | runtime) + 64 * len(conversion.layout) + 2**20


def count_parameters(layout) -> int:
    return sum(math.prod(spec.shape) for spec in layout)


def run_checks(
    folder: Path,
    reader: CheckpointReader,
    conversion: Conversion,
    copied: dict[str, tuple[CheckpointReader, str]] | None = None,
) -> list[dict]:
    """Re-read the written folder and compare it with the plan and the sources (``copied``: output name -> (reader,
    source name) of the tensors passed through)."""
    checks = []
    watch = Stopwatch()

    def timed(check: dict) -> dict:  # each check's cost goes in the report beside it
        check["seconds"] = round(watch.lap(), 3)
        return check

    written = CheckpointReader(folder)
    expected = {spec.name: (spec.dtype, tuple(spec.shape)) for spec in conversion.layout}
    found = {name: (written.info(name).dtype, tuple(written.info(name).shape)) for name in written.names()}
    checks.append(
        timed(
            {
                "name": "shards re-read: headers valid, sizes match, tensors as planned",
                "passed": found == expected,
                "detail": f"{len(found)} tensors in {len(written.shards)} shard(s)",
            }
        )
    )

    if copied is None:
        copied = {name: (reader, name) for name in reader.names() if name in expected}
    small = [name for name, (source, source_name) in copied.items() if source.info(source_name).nbytes <= 2**25]
    sample = sorted({small[0], small[len(small) // 2], small[-1]}) if small else []
    identical = all(
        torch.equal(
            copied[n][0].get(copied[n][1]).reshape(-1).view(torch.uint8), written.get(n).reshape(-1).view(torch.uint8)
        )
        for n in sample
    )
    checks.append(
        timed(
            {
                "name": "untouched tensors byte-identical to the source",
                "passed": identical,
                "detail": ", ".join(sample) or "none passed through",
            }
        )
    )

    config = conversion.config
    if conversion.uses_runtime:
        from .modeling import modeling_upcycle

        model_cls = getattr(modeling_upcycle, config["architectures"][0])
        title = "the runtime builds the planned model and its parameters match the files"
    else:
        import transformers

        model_cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
        title = "plain transformers builds the model and its parameters match the files"
    if model_cls is not None:
        checks.append(
            timed(
                _parameters_check(
                    model_cls,
                    config,
                    {name: shape for name, (_, shape) in found.items()},
                    title,
                    conversion.file_names,
                )
            )
        )
    return checks


def _parameters_check(model_cls, config: dict, found: dict[str, tuple], title: str, file_names=None) -> dict:
    """Build ``model_cls`` from ``config`` on the meta device and compare its parameter names and shapes with the files
    (``file_names`` maps the model's names and shapes to the files' where the on-disk format differs)."""
    with torch.device("meta"):
        model = model_cls(model_cls.config_class.from_dict(config))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if file_names is not None:
        shapes = file_names(shapes)
    prefix = ""
    if model.base_model is model and model.base_model_prefix and not set(shapes) & set(found):
        prefix = f"{model.base_model_prefix}."  # a base model read from a checkpoint with a task head (bert.*)
        shapes = {prefix + name: shape for name, shape in shapes.items()}
        found = {name: shape for name, shape in found.items() if name.startswith(prefix)}
    buffers = {
        prefix + name for name, _ in model.named_buffers()
    }  # non-persistent buffers some checkpoints still hold
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | (
        {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    )
    missing, unexpected = set(shapes) - set(found) - tied, set(found) - set(shapes) - buffers
    reshaped = {name for name in set(shapes) & set(found) if shapes[name] != tuple(found[name])}
    return {
        "name": title,
        "passed": not missing and not unexpected and not reshaped,
        "detail": (
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, other shape {sorted(reshaped)[:3]}"
        )
        if missing or unexpected or reshaped
        else f"{len(shapes)} parameters",
    }


class Stopwatch:
    """Seconds between consecutive :meth:`lap` calls (the first since the stopwatch was made)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now, last = time.perf_counter(), self._last
        self._last = now
        return now - last


@contextmanager
def model_code_prefetched() -> Iterator[None]:
    """While the block runs, import transformers' modeling code (what the build check needs: seconds, whatever the
    model's size) in a background thread, so that it overlaps the plan and the tensor copies (which run in the
    kernel, off the GIL); the thread is joined when the block ends, however it ends.

    The thread holds the interpreter's import lock for the whole import, so an import in any other thread waits for
    it to finish rather than running beside it: transformers' lazily loaded modules, imported from two threads at
    once, can hand one of them a module that is not initialised yet (``cannot import name 'AutoTokenizer'``). The
    wait is at most the import's own time; work that imports nothing (the copies) goes on meanwhile."""
    try:
        import _imp

        acquire, release = _imp.acquire_lock, _imp.release_lock
    except (ImportError, AttributeError):  # not CPython: the build check imports the code when it needs it
        yield
        return
    interval = sys.getswitchinterval()
    holding = threading.Event()

    def load() -> None:
        acquire()
        holding.set()
        try:
            import upcycle.modeling.modeling_upcycle  # noqa: F401  (torch, transformers.modeling_utils, families)
        except Exception:  # the check imports it again and reports what fails
            pass
        finally:
            release()
            sys.setswitchinterval(interval)

    # the import holds the GIL most of the time: hand it back to the copying thread after each of its syscalls
    # within 0.5 ms rather than the default 5 ms (hundreds of tensors, two hand-overs each)
    sys.setswitchinterval(min(interval, 0.0005))
    prefetch = in_background(load, "upcycle-prefetch")
    holding.wait()  # from here on, no import of this thread can start beside the prefetch's
    try:
        yield
    finally:
        prefetch.result()  # a process never exits while the thread is inside torch's or transformers' import


def convert_checkpoint(
    src: str,
    out: Path,
    method: str,
    options,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    card_name: str | None = None,
) -> dict | None:
    """Convert ``src`` into ``out`` (or only print the plan); returns the report.

    ``card_name``: the model's name in its card (a Hub repo id when it will be pushed; default: OUT's name)."""
    from .methods.spec import check_choices

    check_choices(options)
    max_shard = parse_size(shard_size)
    out = Path(out)
    with ExitStack() as stack:
        if not dry_run:
            check_output_location(out)
            refuse_working_folder(out)
            local = Path(src).expanduser()
            if local.exists():  # the inputs' checks, again on the resolved SRC once OUT is locked
                refuse_inputs_inside(out, input_paths(local, options), what="OUT")
            if out.is_symlink() or (out.exists() and not out.is_dir()):  # before a lock file is made beside it
                raise UpcycleError(replace_refusal(out, out, overwrite))
            stack.enter_context(output_parent(out))
            stack.enter_context(output_lock(out))  # one conversion at a time into OUT, until it is renamed in place
            stack.enter_context(model_code_prefetched())
        return _convert(src, out, method, options, max_shard, overwrite, dry_run, card_name)


def _convert(
    src: str,
    out: Path,
    method: str,
    options,
    max_shard: int,
    overwrite: bool,
    dry_run: bool,
    card_name: str | None,
) -> dict | None:
    """:func:`convert_checkpoint` once OUT is locked (not for ``dry_run``)."""
    opened = open_source(src)  # resolved, read, and refused in one line when upcycle already converted it
    folder, reader = opened.folder, opened.reader
    if not dry_run:
        if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
            raise UpcycleError(f"OUT {out} is (inside) the source folder; write the conversion to a new folder")
        refuse_inputs_inside(out, input_paths(folder, options), what="OUT")
        recover_output(out)
        reason = replace_refusal(out, out, overwrite)
        if reason:
            raise UpcycleError(reason)
    watch = Stopwatch()
    conversion = method_spec(method).convert(reader, options)
    settle = conversion.settle
    if dry_run and settle is not None:
        settle()
        settle = None
    timings = {"plan (the method's reads, scores and fits)": watch.lap()}

    before = count_parameters([reader.info(n) for n in reader.names()])
    after = count_parameters(conversion.layout)
    out_bytes = sum(spec.nbytes for spec in conversion.layout)
    if settle is None:
        print("\n".join(conversion.plan_lines))
    else:
        print(f"{method} plan: scored while the tensors are copied, printed when they are written")
    change = f"{after - before:+,} new" if after >= before else f"{after - before:+,}, {1 - after / before:.1%} fewer"
    print(f"parameters: {before:,} -> {after:,} ({change})")
    print(
        f"output size: {out_bytes / 1e9:.3f} GB of tensors in "
        f"{len(ShardedWriter.plan_shards(conversion.layout, max_shard))} shard(s)"
    )
    if dry_run:
        print("dry run: nothing written")
        return None

    needed = output_bytes(conversion, folder)
    check_output_location(out, needed)
    started = time.time()
    watch.lap()  # the timings below start here

    def lap(name: str) -> None:  # where a conversion spends its time, in the report
        timings[name] = watch.lap()

    with atomic_output(out, overwrite, needed_bytes=needed, refusal=replace_refusal) as tmp:
        with ShardedWriter(tmp, conversion.layout, max_shard, metadata={"upcycle_method": method}) as writer:
            progress = tqdm(total=out_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr, disable=None)
            passed_through = {}
            for name, tensor in conversion.tensors():
                if isinstance(tensor, SourceTensor):
                    source = tensor.reader or reader
                    writer.copy_from(source, name, tensor.name)
                    passed_through[name] = (source, tensor.name)
                    progress.update(source.info(tensor.name).nbytes)
                elif isinstance(tensor, ChunkedTensor):
                    writer.write_chunks(name, tensor.dtype, tensor.shape, tensor.chunks())
                    progress.update(math.prod(tensor.shape) * tensor.dtype.itemsize)
                else:
                    writer.write(name, tensor)
                    progress.update(tensor.numel() * tensor.element_size())
            progress.close()
            writer.close()
        lap("write tensors (headers, copies, computed tensors)")
        if settle is not None:
            settle()
            print("\n".join(conversion.plan_lines))
            lap("plan, the part settled beside the copies (waited for after them)")
        (tmp / "config.json").write_text(json.dumps(conversion.config, indent=2, sort_keys=True) + "\n")
        copied = copy_support_files(folder, tmp)
        if conversion.uses_runtime:
            for file in sorted(RUNTIME_DIR.glob("*.py")):
                if file.name != "__init__.py":
                    shutil.copyfile(file, tmp / file.name)
        lap("config, support and runtime files")
        checks = run_checks(tmp, reader, conversion, passed_through)
        lap("checks (each check's seconds are beside it)")
        if not all(check["passed"] for check in checks):
            failed = "; ".join(c["name"] for c in checks if not c["passed"])
            raise UpcycleError(
                f"conversion checks failed ({failed}); nothing was written, please report this as a bug"
            )
        report = {
            "upcycle_version": __version__,
            "method": method,
            "source": src,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 2),
            "parameters": {"before": before, "after": after},
            "plan": conversion.config.get("upcycle"),
            "plan_lines": conversion.plan_lines,
            "description": conversion.description,
            "tags": conversion.tags,
            "base_model": opened.base_model,
            "base_models": base_model_ids(opened, conversion.report.get("experts", [])),
            "base_license": source_license(folder),
            "name": card_name or out.name,
            "auto_class": conversion.auto_class,
            "pipeline_tag": conversion.pipeline_tag,
            **conversion.report,
            "files_copied": copied,
            "checks": checks,
            "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
        }
        (tmp / "upcycle_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_card(tmp)
    print(f"wrote {out}")
    return report
