"""The pipeline's commands of the ``audiotune`` CLI: ``run --local``, ``compile``, ``submit``.

Exit codes of ``run`` and ``compile``: as every command (0 success, 1 the work failed, 2 bad usage or config).
``submit`` is what CI runs, and its 2 means something else (:data:`SUBMIT_EXIT_CODES`): 0 the run was submitted (with
``--wait``: it succeeded; with ``--promote``: and its model is the champion now), 1 the run failed or the host or
registry could not be used, 2 the run succeeded but its model did not beat the champion (``--promote``), 64 bad
usage or config (EX_USAGE; nothing was submitted). Every check that can fail on the config is done before
anything is submitted, so a 64 never follows a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audiotune.config import AudiotuneConfig

EXIT_OK, EXIT_FAILED, EXIT_NOT_PROMOTED = 0, 1, 2
EXIT_SUBMIT_USAGE = 64  # sysexits' EX_USAGE: submit's 2 is "not promoted", so its usage errors must differ
TOKEN_ENV = "KF_PIPELINES_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"  # the variable kfp.Client reads too
SUBMIT_EXIT_CODES = f"""exit codes:
  {EXIT_OK}   submitted; with --wait: the run succeeded; with --promote: and its model is the champion now
  {EXIT_FAILED}   the run failed, timed out, or the Kubeflow host or the MLflow registry could not be used
  {EXIT_NOT_PROMOTED}   --promote: the run succeeded, but its model did not beat the champion (the champion stays)
  {EXIT_SUBMIT_USAGE}  bad usage or config, e.g. no host, or --promote without export.registered_model_name;
      checked before anything is submitted

The token is --token, else $KF_PIPELINES_TOKEN, else the projected ServiceAccount token at
$KF_PIPELINES_SA_TOKEN_PATH (default /var/run/secrets/kubeflow/pipelines/token) when the file exists.
(`audiotune promote` keeps the CLI-wide 2 for bad usage and says "champion stays" with 3.)"""


def usage_exit_code(argv: list[str] | None) -> int:
    """The exit code of a usage error for this command line: 64 for ``submit`` (see :data:`SUBMIT_EXIT_CODES`),
    else argparse's 2."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return EXIT_SUBMIT_USAGE if words[:1] == ["submit"] else 2


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v",
                   help="Override a config field by its dotted path (repeatable).")


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``run``, ``compile`` and ``submit`` on the CLI's subcommands."""
    p = sub.add_parser("run", help="Run the whole pipeline on this machine (kfp.local, a local MLflow store).")
    p.add_argument("--local", dest="config", metavar="CONFIG", required=True,
                   help="The pipeline's YAML config; the run uses Kubeflow's local subprocess runner.")
    p.add_argument("--root", help="Local pipeline root for the task outputs (default: pipeline.root, else "
                                  "./kfp-local).")
    _overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="Compile the pipeline to YAML for upload in the Kubeflow UI.")
    p.add_argument("--output", default="audiotune-finetune.yaml", help="Output YAML (default: %(default)s).")
    p.add_argument("--config", help="Config whose values become the parameters' defaults and whose cluster "
                                    "settings the pods get (default: the schema defaults).")
    _overrides(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="Submit a run to Kubeflow Pipelines; --wait follows it to the end.",
                       epilog=SUBMIT_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="The pipeline's YAML config.")
    p.add_argument("--host", default=os.environ.get(HOST_ENV),
                   help=f"Kubeflow Pipelines URL (default: ${HOST_ENV}).")
    p.add_argument("--experiment", help="Kubeflow experiment (default: tracking.experiment).")
    p.add_argument("--run-name", help="Display name of the run.")
    p.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow).")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"Bearer token (default: ${TOKEN_ENV}, else the ServiceAccount token; see below).")
    p.add_argument("--cookies", help="Session cookies, e.g. authservice_session=...")
    p.add_argument("--wait", action="store_true", help="Follow the run; exit 0 only if it succeeded.")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="With --wait: seconds (default: 1 day).")
    p.add_argument("--poll", type=float, default=15.0, help="With --wait: seconds between polls.")
    p.add_argument("--promote", action="store_true",
                   help="With --wait: move the champion alias to the new model only if it beats the champion; "
                        "exit 2 when it does not. Needs export.registered_model_name.")
    p.add_argument("--metric", default=None, help="With --promote: compare this one metric (lower is better, e.g. "
                   "val_loss) instead of the eval gate (evaluate.gate, on the eval metrics).")
    p.add_argument("--force", action="store_true", help="Submit even when `audiotune plan` says the training "
                   "cannot fit the requested GPUs.")
    _overrides(p)
    p.set_defaults(func=cmd_submit, usage_exit=EXIT_SUBMIT_USAGE)


def _err(command: str, message: str) -> None:
    print(f"audiotune {command}: {message}", file=sys.stderr)


def _eval_card(outputs: dict) -> str | None:
    """The Eval summary table of a local run's evaluate task, if it evaluated the export."""
    from audiotune import artifacts

    for name, out in sorted(outputs.items()):
        for item in out.get("artifacts", {}).get("evaluation", {}).get("artifacts", []) \
                if name.startswith("evaluate-model") else []:
            uri = item.get("metadata", {}).get("uri")
            if uri:
                return artifacts.read_manifest(uri, artifacts.EVAL, artifacts.EVAL_VERSION).get("card")
    return None


def cmd_run(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune run --local CONFIG``."""
    from audiotune import sdk

    try:
        result = sdk.run_local(cfg, root=args.root)
    except sdk.PipelineFailed as err:
        _err("run", f"the pipeline failed: {err}")
        return EXIT_FAILED
    card = _eval_card(result.outputs)
    if card:  # the evaluate task's summary table (before the lines below, which stay the last ones)
        print("\n" + card)
    lines = [
        "",
        "audiotune run: the pipeline finished",
        f"  task outputs: {result.run_dir}",
        f"  export:       {result.export_uri or '(none)'}",
        f"  samples:      {result.samples_uri or '(none)'}",
    ]
    if result.mlflow_ui:
        lines.append(f"  MLflow:       {result.mlflow_ui}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_compile(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune compile [--output PATH] [--config CONFIG]``."""
    from audiotune import sdk

    path = sdk.compile(args.output, cfg)
    print(json.dumps({"output": path}))
    return EXIT_OK


def _submit_usage(args: argparse.Namespace, cfg: AudiotuneConfig) -> str | None:
    """What is wrong with a ``submit`` command line and its config, checked before anything is sent; None: ok."""
    from audiotune import sdk

    if not args.host:
        return f"no Kubeflow host: pass --host or set ${HOST_ENV}"
    if args.promote and not args.wait:
        return "--promote needs --wait"
    if args.wait and (args.timeout <= 0 or args.poll <= 0):
        return f"--timeout ({args.timeout:g}) and --poll ({args.poll:g}) must be positive"
    try:
        sdk.check(cfg, promote=args.promote)
    except sdk.ConfigError as err:
        return str(err)
    if not args.force:  # the same check as `audiotune plan`, before a GPU is requested
        from audiotune.orchestration import plan

        return plan.preflight(cfg)
    return None


def cmd_submit(args: argparse.Namespace, cfg: AudiotuneConfig) -> int:
    """``audiotune submit --config CONFIG --host URL [--wait] [--promote]``; exit codes: :data:`SUBMIT_EXIT_CODES`."""
    from audiotune import sdk

    problem = _submit_usage(args, cfg)
    if problem:
        _err("submit", problem)
        return EXIT_SUBMIT_USAGE
    conn = sdk.Connection(args.host, args.namespace, args.token, args.cookies)
    try:
        run = sdk.submit(cfg, conn, experiment=args.experiment, run_name=args.run_name, namespace=args.namespace)
        print(json.dumps({"run_id": run.run_id, "url": run.url}), flush=True)
        if not args.wait:
            return EXIT_OK
        state = sdk.wait(run.run_id, timeout=args.timeout, host=conn, poll_s=args.poll,
                         progress=lambda line: print(line, flush=True))
        if state != "SUCCEEDED":
            _err("submit", f"run {run.run_id} {state.lower()}: {run.url}")
            for line in sdk.failure_report(run.run_id, conn):
                print(line, file=sys.stderr)
            return EXIT_FAILED
    except sdk.SubmitError as err:
        _err("submit", str(err))
        return EXIT_FAILED
    except TimeoutError as err:
        _err("submit", str(err))
        return EXIT_FAILED
    print(f"run {run.run_id} succeeded: {run.url}")
    if not args.promote:
        return EXIT_OK
    outcome = sdk.promote(cfg, run.run_id, metric=args.metric)
    print(outcome.message)
    return EXIT_OK if outcome.promoted else EXIT_NOT_PROMOTED
