"""The `adaprune` command: convert, calibrate, inspect, publish, demo, bench and eval.

Each subcommand is one entry of `SUBCOMMANDS`: (name, help, add_arguments(parser), run(args) -> exit code). Bad
arguments, paths or settings end with one line on stderr, `adaprune: error: ...`, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from adaprune.configuration_adaprune import AnyResPruningSettings
from adaprune.settings import setting_type

from . import benchmark, demo, evaluation
from .calibration import CalibrationError
from .model_card import CALIBRATION_FILE, PublishError, publish_checkpoint
from .workflow import (
    DEFAULT_PROMPT,
    LoadedModel,
    UsageError,
    calibrate_checkpoint,
    check_calibration_request,
    convert_checkpoint,
    image_set,
    inspect_image,
    load_model,
    open_image,
    positive_float,
    positive_int,
)

PROG = "adaprune"
USAGE_EXIT = 2
EXPECTED_ERRORS = (UsageError, CalibrationError, PublishError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`adaprune: error: ...`) rather than the usage text and a message."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _integer_or_none(value: str) -> int | None:
    """An integer setting whose default is None: an integer, or 'none'."""
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None


def pruning_options() -> dict[str, tuple[Any, str]]:
    """Every pruning setting of every model family and registered method as an option: name -> (type or action,
    help), from the settings' declarations. Values are validated by the model type's settings class, with the
    config's messages."""
    options: dict[str, tuple[Any, str]] = {}
    for name, (declaration, group) in AnyResPruningSettings.declared().items():
        kind = setting_type(declaration, group)
        if kind is bool:
            parse: Any = argparse.BooleanOptionalAction
        elif kind is int and declaration.default is None:
            parse = _integer_or_none
        else:
            parse = kind
        options[name] = (parse, f"{declaration.metadata['help']} (default {declaration.default!r})")
    return options


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    """The pruning settings as options (--energy-ratio, --min-tokens, ...); unset ones keep the checkpoint's."""
    group = parser.add_argument_group("pruning settings (default: the checkpoint's, else adaprune's defaults)")
    for field, (kind, help_text) in pruning_options().items():
        option = f"--{field.replace('_', '-')}"
        help_text = help_text.replace("%", "%%")
        if kind is argparse.BooleanOptionalAction:
            group.add_argument(option, dest=field, action=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(option, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)


def pruning_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning settings given on the command line."""
    return {field: getattr(args, field) for field in pruning_options() if hasattr(args, field)}


def add_private_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="llava-hf checkpoint directory or Hub id")
    parser.add_argument("dest", metavar="DEST", type=Path, help="directory to write the converted checkpoint to")
    parser.add_argument("--base-model", help="Hub id of the base model for the card (default: SRC if it is a Hub id)")
    parser.add_argument("--license", help="licence for the card (default: the one in SRC's model card)")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload DEST to this Hub repository")
    add_private_argument(parser)
    add_pruning_arguments(parser)


def run_convert(args: argparse.Namespace) -> int:
    if args.private and not args.push_to_hub:
        raise UsageError("--private applies to --push-to-hub REPO_ID; add it or drop --private")
    dest = convert_checkpoint(
        args.src,
        args.dest,
        pruning_overrides(args),
        base_model=args.base_model,
        license=args.license,
        overwrite=args.overwrite,
    )
    if args.push_to_hub:
        _publish(dest, args.push_to_hub, args.private)
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the pruning settings that override its own (see `loaded_model`)."""
    parser.add_argument("model", metavar="MODEL", help="converted or llava-hf checkpoint directory, or Hub id")
    add_pruning_arguments(parser)


def loaded_model(args: argparse.Namespace) -> LoadedModel:
    """MODEL as the pruning model, with the command line's pruning settings over the checkpoint's."""
    return load_model(args.model, pruning_overrides(args))


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "images", metavar="IMAGES", type=Path, help="folder of image files, or a dataset saved with datasets"
    )
    parser.add_argument(
        "--target-mean-tokens", type=positive_float, required=True, help="mean tokens per image tau is chosen for"
    )
    parser.add_argument("--image-column", help="image column of a dataset (default: its first Image column)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward (default 8)")
    parser.add_argument("--examples", type=positive_int, default=4, help="images shown in the plots (default 4)")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/calibrate"), help="where plots and calibration.json go"
    )
    parser.add_argument(
        "--write-config",
        action="store_true",
        help=f"store tau in MODEL's config.json, the statistics in MODEL/{CALIBRATION_FILE}, and update its card",
    )


def run_calibrate(args: argparse.Namespace) -> int:
    images = image_set(args.images, args.image_column)
    check_calibration_request(args.model, pruning_overrides(args), args.write_config)
    calibrate_checkpoint(
        loaded_model(args),
        images,
        args.target_mean_tokens,
        args.output_dir,
        batch_size=args.batch_size,
        examples=args.examples,
        write_config=args.write_config,
    )
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("image", metavar="IMAGE", type=Path, help="an image file")
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"question about the image (default {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit (default 32)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed prefill runs (median; default 3)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/inspect"), help="where the overlay PNG goes")


def run_inspect(args: argparse.Namespace) -> int:
    open_image(args.image)  # a bad path fails before the model loads
    inspect_image(
        loaded_model(args),
        args.image,
        args.output_dir,
        question=args.prompt,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
    )
    return 0


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, help="a converted checkpoint directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. your-name/llava-1.5-7b-adaprune")
    add_private_argument(parser)


def _publish(checkpoint: Path, repo_id: str, private: bool) -> None:
    commit = publish_checkpoint(checkpoint, repo_id, private=private)
    print(f"published {checkpoint} to https://huggingface.co/{repo_id} (model card pinned to revision {commit})")


def run_publish(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_dir():
        raise UsageError(f"CHECKPOINT {str(args.checkpoint)!r} is not a directory; pass a converted checkpoint")
    _publish(args.checkpoint, args.repo_id, args.private)
    return 0


Subcommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

SUBCOMMANDS: list[Subcommand] = [
    (
        "convert",
        "make a pruning checkpoint (loads with trust_remote_code) from a llava-hf one",
        add_convert_arguments,
        run_convert,
    ),
    (
        "calibrate",
        "find tau for a target mean number of tokens per image on your images",
        add_calibrate_arguments,
        run_calibrate,
    ),
    (
        "inspect",
        "one image: its budget, kept patches, and answers and prefill times with pruning on and off",
        add_inspect_arguments,
        run_inspect,
    ),
    ("publish", "upload a converted checkpoint to the Hugging Face Hub", add_publish_arguments, run_publish),
    (
        "demo",
        "convert, calibrate and inspect on a built-in small LLaVA (or --model), offline",
        demo.add_arguments,
        demo.run,
    ),
    (
        "bench",
        "measure speed, memory and budget cost against the stock model (writes tables and plots)",
        benchmark.add_arguments,
        benchmark.run,
    ),
    (
        "eval",
        "accuracy on the synthetic visual-question task, unpruned and at matched mean budgets (tables and a plot)",
        evaluation.add_arguments,
        evaluation.run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        command = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit code (0, or 2 after a one-line error)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join([PROG, *argv])
        return args.run(args)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else USAGE_EXIT
    except EXPECTED_ERRORS as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
