"""The ``audiotune`` command line: every stage with the same shape, as the pipeline runs it.

Exit codes: 0 success, 1 the work failed, 2 bad usage or configuration (an output that overlaps an input or holds
something other than an artifact of its kind counts as usage). Two commands add one: ``promote`` exits 3 when the
champion stays; ``submit``, whose contract gives 2 to "succeeded, champion stays", moves its usage errors to 64 (see
:mod:`audiotune.pipeline_cli`); ``train`` exits 143 when SIGTERM stopped it after a checkpoint. Every error is one
line on stderr (:class:`~audiotune.errors.AudiotuneError` carries its exit code); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from audiotune import __version__, credentials
from audiotune.config import AudiotuneConfig, ConfigError, load_config
from audiotune.errors import AudiotuneError

log = logging.getLogger("audiotune")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FORMATS = ("jsonl", "acestep", "kaldi", "text")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=v",
        help="Override a config field by its dotted path (repeatable), e.g. --set convert.sample_rate=24000.",
    )


def _add_config(p: argparse.ArgumentParser, config_help: str, func: Callable[..., int]) -> None:
    """``--config`` and ``--set``, and the command's function."""
    p.add_argument("--config", help=config_help)
    _add_overrides(p)
    p.set_defaults(func=func)


def _add_common(p: argparse.ArgumentParser, func: Callable[..., int]) -> None:
    """What every stage command takes: ``--output``, ``--config``, ``--set``; and the command's function."""
    p.add_argument("--output", required=True, help="Output artifact URI (local path or s3://bucket/prefix).")
    _add_config(p, "The pipeline's YAML config; this stage reads its own section.", func)


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


def _cmd_encode(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.stages.encode_acestep import encode_acestep

    result = encode_acestep(cfg, dataset=args.dataset, output=args.output, base_model=args.base_model)
    print(json.dumps({"output": result.output, "splits": result.manifest["splits"]}))
    return EXIT_OK


def _cmd_train(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.train.launch import relaunch, under_torchrun

    section = {"llm": cfg.llm, "flow": cfg.flow, "joint": cfg.joint, "acestep": cfg.acestep}[args.stage]
    if section.train.nproc_per_node > 1 and not under_torchrun():
        return relaunch(section.train.nproc_per_node, sys.argv[1:] if args.argv is None else args.argv)
    from audiotune.train import sizing
    from audiotune.train.engine import TrainingInterrupted

    try:  # zero_stage auto by hand: the same choice as the pipeline's launcher makes (no GPU: no ZeRO)
        cfg, _ = sizing.with_zero(args.stage, cfg,
                                nproc=int(os.environ.get("LOCAL_WORLD_SIZE", section.train.nproc_per_node)))
    except sizing.SizingError as err:
        print(f"audiotune train {args.stage}: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.stage == "acestep":
            from audiotune.stages.train_acestep import train_acestep

            result = train_acestep(cfg, tokens=args.tokens, output=args.output, base_model=args.base_model)
        elif args.stage == "flow":
            from audiotune.stages.train_flow import train_flow

            result = train_flow(cfg, tokens=args.tokens, output=args.output, base_flow=args.base_flow)
        elif args.stage == "joint":
            from audiotune import storage
            from audiotune.stages.train_joint import train_joint

            joint = train_joint(cfg, tokens=args.tokens, llm=args.llm, flow=args.flow,
                                llm_output=args.llm_output or storage.join(args.output, "llm"),
                                flow_output=args.flow_output or storage.join(args.output, "flow"))
            if joint.llm_manifest is not None:
                print(json.dumps({"llm_output": joint.llm_output, "flow_output": joint.flow_output,
                                  "metrics": joint.metrics}))
            return EXIT_OK
        else:
            from audiotune.stages.train_llm import train_llm

            result = train_llm(cfg, tokens=args.tokens, output=args.output, base_model=args.base_model)
    except TrainingInterrupted as err:
        print(f"audiotune train {args.stage}: {err}", file=sys.stderr)
        return 143
    if result.manifest is not None:
        print(json.dumps({"output": result.output, "metrics": result.metrics}))
    return EXIT_OK


EXIT_NOT_PROMOTED = 3


def _cmd_export(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.stages.export import export

    result = export(cfg, output=args.output, llm=args.llm, flow=args.flow, tokens=args.tokens)
    print(json.dumps({"output": result.output, "registered_version": result.registered_version,
                      "metrics": result.metrics}))
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.stages.evaluate import evaluate

    result = evaluate(cfg, model=args.model, output=args.output, eval_set=args.eval_set)
    print(result.manifest["card"])
    print(json.dumps({"output": result.output, "registered_version": result.registered_version,
                      "eval_set_fingerprint": result.manifest["eval_set_fingerprint"], "metrics": result.means()}))
    return EXIT_OK


def _cmd_synthesize(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune import artifacts, storage
    from audiotune.export.synthesis import Synthesizer, write_wav

    artifacts.read_manifest(args.model, artifacts.EXPORT, artifacts.EXPORT_VERSION)
    settings = cfg.export.synthesis
    if args.vocoder:
        settings = settings.model_copy(update={"vocoder": args.vocoder})
    synth = Synthesizer(storage.local_copy(args.model), settings)
    speech = synth.synthesize(args.text, prompt_wav=args.prompt_wav, prompt_text=args.prompt_text,
                              speaker=args.speaker)
    write_wav(args.out, speech)
    print(json.dumps({"out": args.out, "seconds": round(speech.seconds, 3), "frames": int(speech.codes.shape[1]),
                      "sample_rate": speech.sample_rate}))
    return EXIT_OK


def _cmd_promote(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.export import registry

    if args.metric is None:  # the eval gate (evaluate.gate), champion and challenger on the same eval set
        from audiotune.stages.evaluate import champion_evaluator

        outcome = registry.promote_gated(cfg.tracking, args.model_name, cfg.evaluate.gate, version=args.version,
                                         alias=args.alias, evaluator=champion_evaluator(cfg))
    else:
        outcome = registry.promote(cfg.tracking, args.model_name, version=args.version, metric=args.metric,
                                   greater_is_better=args.greater_is_better, alias=args.alias)
    print(outcome.message)
    return EXIT_OK if outcome.promoted else EXIT_NOT_PROMOTED


def _cmd_plan(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    import contextlib

    from audiotune.orchestration import plan

    tokens = args.dataset_tokens or (plan.dataset_tokens(args.tokens) if args.tokens else None)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; stdout is the plan (--json)
        plans = plan.plan(cfg, gpu_gib=args.gpu_gib, tokens=tokens, mfu=args.mfu)
    print(json.dumps([p.to_dict() for p in plans], indent=2) if args.json else plan.format_plan(plans), flush=True)
    plan.check(plans)  # PlanRefused: one line on stderr, exit 2
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiotune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"audiotune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="Convert a source corpus into a Dataset artifact.")
    p.add_argument("--source", help="Source URI: a manifest file or a folder, local or s3://.")
    p.add_argument("--format", choices=FORMATS, help="Source layout (default: autodetect).")
    _add_common(p, _cmd_convert)

    p = sub.add_parser("tokenize", help="Tokenize a Dataset artifact into a Tokens artifact.")
    p.add_argument("--dataset", help="Dataset artifact URI (local or s3://); only a MOSS-TTSD import omits it.")
    p.add_argument("--base-model", help="Base model URI whose tokenizer to use (default: tokenize.base_model).")
    _add_common(p, _cmd_tokenize)

    p = sub.add_parser("encode", help="Encode a Dataset once with a model's own encoders (acestep: VAE latents and "
                       "caption/lyric conditioning).")
    encode_sub = p.add_subparsers(dest="family", required=True)
    p = encode_sub.add_parser("acestep", help="Dataset (convert --format acestep) → ACE-Step Latents artifact.")
    p.add_argument("--dataset", required=True, help="Dataset artifact URI (local or s3://).")
    p.add_argument("--base-model", help="diffusers AceStepPipeline folder (default: acestep.base_model).")
    _add_common(p, _cmd_encode)

    p = sub.add_parser("train", help="Train a model: llm or flow (joint follows).")
    train_sub = p.add_subparsers(dest="stage", required=True)
    p = train_sub.add_parser("llm", help="Train the causal LM (LoRA, full or from scratch) on a Tokens artifact.")
    p.add_argument("--tokens", required=True, help="Tokens artifact URI (local or s3://).")
    p.add_argument("--base-model", help="Base causal LM URI (default: llm.base_model).")
    _add_common(p, _cmd_train)
    p = train_sub.add_parser("flow", help="Train the flow-matching token→mel decoder on a Tokens artifact.")
    p.add_argument("--tokens", required=True, help="Tokens artifact URI (local or s3://).")
    p.add_argument("--base-flow", help="Starting Flow artifact, config.json + model.safetensors folder, or a "
                   "CosyVoice / Step-Audio-EditX release folder (yaml + flow.pt; see flow.arch) "
                   "(default: flow.base_flow; unset: random init of flow.preset).")
    _add_common(p, _cmd_train)
    p = train_sub.add_parser("acestep", help="LoRA on ACE-Step 1.5's diffusion transformer (diffusers) from an "
                             "ACE-Step Latents artifact (encode acestep).")
    p.add_argument("--tokens", required=True, help="ACE-Step Latents artifact URI (local or s3://).")
    p.add_argument("--base-model", help="diffusers AceStepPipeline folder (default: acestep.base_model, else the "
                   "one the Latents were encoded with).")
    _add_common(p, _cmd_train)
    p = train_sub.add_parser("joint", help="Train an LLM and a flow artifact together (loss w_llm·L_llm + "
                             "w_flow·L_flow); writes <output>/llm and <output>/flow.")
    p.add_argument("--tokens", required=True, help="Tokens artifact URI both models were trained on.")
    p.add_argument("--llm", required=True, help="LLM model artifact URI (LoRA adapter or full model).")
    p.add_argument("--flow", required=True, help="Flow model artifact URI.")
    p.add_argument("--llm-output", help="Where the LLM artifact goes (default <output>/llm).")
    p.add_argument("--flow-output", help="Where the Flow artifact goes (default <output>/flow).")
    _add_common(p, _cmd_train)

    p = sub.add_parser("export", help="Merge, verify, package, upload and register trained models.")
    p.add_argument("--llm", help="LLM model artifact URI (omit in flow-only runs).")
    p.add_argument("--flow", help="Flow model artifact URI (omit in llm-only runs).")
    p.add_argument("--tokens", help="Tokens artifact URI (default: the one the models were trained on).")
    _add_common(p, _cmd_export)

    p = sub.add_parser("evaluate", help="Synthesize a fixed eval set with an export and score it (WER/CER, "
                       "speaker similarity, DNSMOS, MCD, F0, duration) into an Eval artifact.")
    p.add_argument("--model", required=True, help="Export URI (local or s3://).")
    p.add_argument("--eval-set", help="A Dataset artifact or a JSONL eval set (default: evaluate.eval_set, else "
                   "the validation rows of the export's Dataset).")
    _add_common(p, _cmd_evaluate)

    p = sub.add_parser("synthesize", help="Speak a text with an exported model (LLM → flow → vocoder).")
    p.add_argument("--model", required=True, help="Export URI (local or s3://).")
    p.add_argument("--text", required=True, help="What to say.")
    p.add_argument("--prompt-wav", help="A recording of the voice to clone (needs --prompt-text).")
    p.add_argument("--prompt-text", help="The transcript of --prompt-wav.")
    p.add_argument("--speaker", help="A speaker of the training data (speaker-id or embedding flows).")
    p.add_argument("--vocoder", help="griffin-lim[:N], a CosyVoice / Step-Audio-EditX release folder (yaml with "
                   "hift: + hift.pt) or a TorchScript / ONNX vocoder file (default: export.synthesis.vocoder).")
    p.add_argument("--out", required=True, help="WAV file to write.")
    _add_config(p, "YAML config (export.synthesis settings).", _cmd_synthesize)

    p = sub.add_parser("promote", help="Move the champion alias to a registered version if it is better; exit 0 "
                       f"when promoted, {EXIT_NOT_PROMOTED} when the champion stays.",
                       epilog=f"exit codes: 0 promoted, 1 the registry could not be used, 2 bad usage or config, "
                       f"{EXIT_NOT_PROMOTED} the champion stays. (`submit --wait --promote` says 'champion stays' "
                       "with 2, as CI expects of it, and bad usage with 64; this command keeps the CLI-wide 2 for "
                       "bad usage.)")
    p.add_argument("--model-name", required=True, help="Registered model name.")
    p.add_argument("--version", help="Challenger version (default: the newest).")
    p.add_argument("--metric", default=None, help="Compare this one metric (a metric.<name> tag of the versions, "
                   "e.g. val_loss) instead of the eval gate (evaluate.gate: champion and challenger on the same "
                   "eval set).")
    p.add_argument("--greater-is-better", action="store_true", help="Higher metric wins (default: lower).")
    p.add_argument("--alias", default="champion", help="The alias of the model in production.")
    _add_config(p, "YAML config (its tracking section says where the registry is).", _cmd_promote)

    from audiotune.pipeline_cli import add_pipeline_commands  # run --local, compile, submit

    add_pipeline_commands(sub)

    p = sub.add_parser("plan", help="Per-GPU memory, the ZeRO choice, tokens/s and wall time of a run's training "
                       "stages; exit 2 (one line) when it cannot fit the requested GPUs. Needs no GPU.")
    p.add_argument("config", help="The pipeline's YAML config.")
    p.add_argument("--gpu-gib", type=float, help="Memory of one GPU (default: from cluster.gpu_type, else the GPU "
                   "visible here).")
    p.add_argument("--tokens", help="Tokens artifact whose report.json gives the dataset's token count.")
    p.add_argument("--dataset-tokens", type=int, help="The dataset's token count (instead of --tokens).")
    p.add_argument("--mfu", type=float, default=0.35, help="Model FLOPs utilisation assumed for tokens/s "
                   "(default: %(default)s).")
    p.add_argument("--json", action="store_true", help="Print the plans as JSON.")
    _add_overrides(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("config", help="Print the resolved config (YAML) or its JSON schema.")
    p.add_argument("--schema", action="store_true", help="Print the JSON schema instead.")
    _add_config(p, "YAML config to resolve.", _cmd_config)
    return parser


def _cmd_config(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    from audiotune.config import dump_config

    if args.schema:
        print(json.dumps(AudiotuneConfig.model_json_schema(), indent=2))
    else:
        print(dump_config(cfg), end="")
    return EXIT_OK


def _failure_types() -> tuple[type[BaseException], ...]:
    """Errors outside the :class:`~audiotune.errors.AudiotuneError` tree that still mean 'the work failed'.

    Only third-party ones (a missing or existing file, the S3 client's): every project error, the model
    packages' included, is an ``AudiotuneError`` and carries its exit code.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    return (FileExistsError, FileNotFoundError, BotoCoreError, ClientError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    from audiotune.pipeline_cli import usage_exit_code

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:  # argparse's usage errors exit 2, which `submit` reserves for "not promoted"
        if err.code == EXIT_USAGE:
            raise SystemExit(usage_exit_code(argv)) from None
        raise
    args.argv = argv
    usage = getattr(args, "usage_exit", EXIT_USAGE)
    rank = os.environ.get("RANK", "0")  # torchrun workers other than rank 0 only warn: one log per run
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank in ("", "0") else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # URIs from the environment (MLFLOW_TRACKING_URI) too
        handler.addFilter(credentials.RedactingFilter())
    try:
        credentials.refuse({f"--{k.replace('_', '-')}": v for k, v in vars(args).items()
                            if k not in ("argv", "overrides") and isinstance(v, (str, list))})
        credentials.refuse({f"--set {k}": v for k, _, v in (o.partition("=") for o in args.overrides or [])})
        credentials.refuse({name: os.environ[name] for name in credentials.URI_ENVIRONMENT if os.environ.get(name)})
        cfg = load_config(args.config, args.overrides)
    except AudiotuneError as err:  # ConfigError included
        return _report_known(args, err, usage)
    func: Callable[[argparse.Namespace, AudiotuneConfig], int] = args.func
    try:
        return func(args, cfg)
    except AudiotuneError as err:  # ConfigError included
        return _report_known(args, err, usage)
    except _failure_types() as err:
        return _report(args, err, EXIT_FAILED)
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, the traceback with -v
        return _report(args, err, EXIT_FAILED, unexpected=True)
    except KeyboardInterrupt:
        print(f"audiotune {args.command}: interrupted", file=sys.stderr)
        return 130


def _report_known(args: argparse.Namespace, err: AudiotuneError, usage: int) -> int:
    """Report a project error: a config error as ``audiotune: <message>``, any other by :func:`_report`; a usage
    error exits ``usage`` (2, or 64 for ``submit``), any other with the error's own exit code."""
    if isinstance(err, ConfigError):
        print(f"audiotune: {credentials.redact(str(err))}", file=sys.stderr)
        return usage
    return _report(args, err, usage if err.exit_code == EXIT_USAGE else err.exit_code)


def _report(args: argparse.Namespace, err: BaseException, code: int, unexpected: bool = False) -> int:
    """Print ``err`` as one line (its traceback too with ``-v``) and return the exit code ``code``.

    An error of no known kind (a third-party error nobody wrapped, a bug) is named by its type and
    points at ``-v``, which logs the traceback.
    """
    if args.verbose:
        log.exception("failed")
    message = credentials.redact(" ".join(str(err).split())) or type(err).__name__
    if unexpected:
        message = f"{type(err).__name__}: {message}" + ("" if args.verbose else " (run with -v for the traceback)")
    print(f"audiotune {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
