"""`gbif-assets`: build, validate, run the emulator, or run the offline demo.

`build` runs the same Dagster definitions the UI serves, in-process, in dependency order: the
unpartitioned upstream assets, then one run per label partition, then the merged metadata and the
reports, and exits non-zero if an asset or a blocking check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gbif_assets.recipe import Recipe, RecipeError, load_recipe


def _cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    mode, label = recipe.source.mode, recipe.label
    print(f"{args.recipe}: OK - dataset {recipe.name!r}, mode {mode}, label {label}")
    if recipe.source.mode == "download":
        print("GBIF download predicate:")
        print(json.dumps(recipe.predicate(), indent=2))
    elif recipe.source.mode == "search":
        predicate = recipe.predicate()
        print("GBIF occurrence search parameters: " + "&".join(f"{k}={v}" for k, v in recipe.search_params()))
        print("Equivalent download predicate:")
        print(json.dumps(predicate, indent=2))
    else:
        print(f"existing download: {recipe.source.key}")
    return 0


def _cmd_emulator(args: argparse.Namespace) -> int:
    from gbif_assets.emulator import run_emulator

    run_emulator(host=args.host, port=args.port)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from gbif_assets.build import BuildOptions, run_build

    recipe = load_recipe(args.recipe)
    if args.home:
        os.environ["GBIF_ASSETS_HOME"] = str(Path(args.home).resolve())
    options = BuildOptions(
        select=args.select,
        partitions=args.partition or [],
        verbose=args.verbose,
        poll_seconds=args.poll_seconds,
        wait_timeout_s=args.wait_timeout,
    )
    return run_build(recipe, options)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gbif_assets.build import BuildOptions, run_build
    from gbif_assets.emulator import Emulator

    recipe_path = Path(args.recipe)
    recipe: Recipe = load_recipe(recipe_path)
    home = Path(args.home).resolve()
    with Emulator() as emulator:
        os.environ["GBIF_API_URL"] = emulator.api_url
        os.environ["GBIF_ASSETS_HOME"] = str(home)
        os.environ["GBIF_ASSETS_ALLOW_PRIVATE_HOSTS"] = "1"
        print(f"GBIF emulator at {emulator.api_url}; building {recipe.name} into {home / recipe.name}")
        started = time.monotonic()
        code = run_build(recipe, BuildOptions(verbose=args.verbose))
        print(f"demo finished in {time.monotonic() - started:.1f} s")
        return code


def _seconds(text: str) -> float:
    """A duration of more than 0 seconds (0 would poll GBIF in a tight loop, below 0 crashed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gbif-assets", description="GBIF occurrence media to ML image training sets (Dagster)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print the resolved GBIF predicate")
    p.add_argument("recipe", help="path to datasets/<name>.yaml")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("build", help="materialize a recipe's assets in-process")
    p.add_argument("recipe", help="path to datasets/<name>.yaml")
    p.add_argument(
        "--select",
        help="asset keys (comma-separated, e.g. invasive_plants/occurrences) or Dagster selection "
        "syntax (e.g. 'key:invasive_plants/occurrences+'); default: everything",
    )
    p.add_argument("--partition", action="append", help="only this label (repeatable)")
    p.add_argument("--home", help="dataset root (default $GBIF_ASSETS_HOME or ./data)")
    p.add_argument(
        "--poll-seconds",
        type=_seconds,
        default=os.environ.get("GBIF_ASSETS_POLL_SECONDS", "30"),
        help="seconds between checks of a pending GBIF download (default 30)",
    )
    p.add_argument("--wait-timeout", type=_seconds, default=6 * 3600, help="max seconds to wait for GBIF")
    p.add_argument("-v", "--verbose", action="store_true", help="show Dagster's event log")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("emulator", help="run the offline GBIF emulator (API, archives, image hosts)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=_cmd_emulator)

    p = sub.add_parser("demo", help="start the emulator and build the example recipe, offline")
    p.add_argument("--recipe", default="datasets/invasive_plants.yaml")
    p.add_argument("--home", default="data")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def _quiet_interrupts(unraisable: Any) -> None:
    """Ctrl-C that lands in a garbage-collection callback (SQLAlchemy's, in Dagster's storage)
    cannot be raised there, and Python printed it as a traceback; the build sees the signal
    anyway (build._signals_seen) and ends with 130. Every other unraisable error is printed."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; recipe, GBIF and settings errors become one clear line and exit code 2."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background of a script, which ignores SIGINT for its children: Dagster
        # takes SIGINT over while it runs a step, so it stopped some steps and not the rest.
        # `kill -INT` is asked for, and always ends the build (exit 130).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _quiet_interrupts
    args = _parser().parse_args(argv)
    try:  # Ctrl-C during the imports (Dagster's take a second) is an interrupt like any other
        from gbif_assets.gbif import GbifError
        from gbif_assets.settings import SettingsError
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return int(args.func(args) or 0)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GbifError as exc:
        print(f"error: GBIF: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gbif-assets validate ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
