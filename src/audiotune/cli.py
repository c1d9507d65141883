"""The ``audiotune`` command line: every stage with the same shape, as the pipeline runs it.

Exit codes: 0 success, 1 the work failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from audiotune import __version__
from audiotune.config import AudiotuneConfig, ConfigError, load_config

log = logging.getLogger("audiotune")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FORMATS = ("jsonl", "acestep", "kaldi", "text")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="Output artifact URI (local path or s3://bucket/prefix).")
    p.add_argument("--config", help="The pipeline's YAML config; this stage reads its own section.")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=v",
        help="Override a config field by its dotted path (repeatable), e.g. --set convert.sample_rate=24000.",
    )


def _cmd_convert(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.stages.convert import convert

    result = convert(cfg, source=args.source, output=args.output, fmt=args.format)
    rows = result.report["rows"]
    print(json.dumps({"output": result.output, "rows": rows, "throughput": result.report["throughput"]}))
    return EXIT_OK


def _cmd_tokenize(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.stages.tokenize import tokenize

    result = tokenize(cfg, dataset=args.dataset, output=args.output, base_model=args.base_model)
    print(json.dumps({"output": result.output, "rows": result.report["rows"],
                      "throughput": result.report["throughput"]}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiotune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"audiotune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="Convert a source corpus into a Dataset artifact.")
    p.add_argument("--source", help="Source URI: a manifest file or a folder, local or s3://.")
    p.add_argument("--format", choices=FORMATS, help="Source layout (default: autodetect).")
    _add_common(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("tokenize", help="Tokenize a Dataset artifact into a Tokens artifact.")
    p.add_argument("--dataset", help="Dataset artifact URI (local or s3://); only a MOSS-TTSD import omits it.")
    p.add_argument("--base-model", help="Base model URI whose tokenizer to use (default: tokenize.base_model).")
    _add_common(p)
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("config", help="Print the resolved config (YAML) or its JSON schema.")
    p.add_argument("--config", help="YAML config to resolve.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v")
    p.add_argument("--schema", action="store_true", help="Print the JSON schema instead.")
    p.set_defaults(func=_cmd_config)
    return parser


def _cmd_config(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.config import dump_config

    if args.schema:
        print(json.dumps(AudiotuneConfig.model_json_schema(), indent=2))
    else:
        print(dump_config(cfg), end="")
    return EXIT_OK


def _failure_types() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the work failed' and deserve one clear line, not a traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    from audiotune.artifacts import ArtifactError
    from audiotune.data.sources.base import SourceError
    from audiotune.stages.convert import ConvertError
    from audiotune.stages.tokenize import TokenizeError
    from audiotune.tokenization.audio_tokenizers import TokenizerError
    from audiotune.tokenization.text import TextTokenizerError
    from audiotune.tracking import TrackingError

    return (ArtifactError, SourceError, ConvertError, TokenizeError, TokenizerError, TextTokenizerError,
            TrackingError, FileExistsError, FileNotFoundError, BotoCoreError, ClientError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"audiotune: {err}", file=sys.stderr)
        return EXIT_USAGE
    func: Callable[[argparse.Namespace, AudiotuneConfig], int] = args.func
    try:
        return func(args, cfg)
    except ConfigError as err:
        print(f"audiotune: {err}", file=sys.stderr)
        return EXIT_USAGE
    except _failure_types() as err:
        if args.verbose:
            log.exception("failed")
        print(f"audiotune {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
