"""The `loraplex` command line."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

from loraplex import __version__
from loraplex.api.types import AdapterFormat, Runtime
from loraplex.logs import configure


def _run_operator(args: argparse.Namespace) -> int:
    import kopf

    import loraplex.operator.handlers  # noqa: F401  (registers the handlers)

    configure(args.log_level)
    if args.log_level != "debug":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per handled event is noise
    if args.all_namespaces and args.namespace:
        print("loraplex operator: use either --namespace or --all-namespaces, not both", file=sys.stderr)
        return 2
    if not args.all_namespaces and not args.namespace:
        print("loraplex operator: name the namespaces to watch (--namespace, repeatable) or --all-namespaces",
              file=sys.stderr)
        return 2
    # Peers with equal priority all pause, and every replica of a Deployment gets the same arguments:
    # a random priority makes exactly one of them the active one.
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(namespaces=None if args.all_namespaces else list(args.namespace)),
    )
    return 0


def _run_sidecar(args: argparse.Namespace) -> int:
    import asyncio

    from loraplex.api.contract import SettingsError, SidecarSettings
    from loraplex.sidecar.main import run

    try:
        settings = SidecarSettings.from_environment()
    except SettingsError as exc:
        print(f"loraplex sidecar: {exc}", file=sys.stderr)
        return 2
    configure(args.log_level or settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


class UsageError(Exception):
    """A command line that cannot run; the message is printed and the command exits 2."""


def _base_config(command: str, path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"loraplex {command}: cannot read --base-config {path}: {exc}") from None


def _run_convert(args: argparse.Namespace) -> int:

    from loraplex.formats import Rejection
    from loraplex.formats.convert import ConversionError, convert

    source: Path = args.source
    if not source.is_dir():
        print(f"loraplex convert: {source} is not an adapter folder", file=sys.stderr)
        return 2
    base_config = _base_config("convert", args.base_config)
    try:
        done = convert(source, args.out, base_config)
    except ConversionError as exc:
        print(f"loraplex convert: {exc}", file=sys.stderr)
        return 2
    except Rejection as rejection:
        print(f"loraplex convert: cannot convert: {rejection}", file=sys.stderr)
        return 1
    report = done.report
    print(f"converted {done.source_format.value} to a Hugging Face PEFT adapter in {args.out}: rank {report.rank}, "
          f"targets {', '.join(report.target_modules)}")
    return 0


def _run_crds(args: argparse.Namespace) -> int:
    from loraplex.api.crds import crd_files, write_crds

    directory: Path = args.directory
    if args.check:
        stale = [name for name, text in crd_files().items()
                 if not (directory / name).exists() or (directory / name).read_text() != text]
        if stale:
            print(f"{directory}: {', '.join(stale)} out of date with loraplex/api/types.py; "
                  "run `make crds`", file=sys.stderr)
            return 1
        return 0
    for path in write_crds(directory):
        print(f"wrote {path}")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from loraplex.api.runtime_capabilities import (
        RUNTIMES,
        capabilities,
        parse_version,
        version_note,
    )
    from loraplex.formats import AdapterPolicy, Rejection, detect_format, nemo2
    from loraplex.formats.for_runtime import validate_or_convert

    path: Path = args.path
    if not path.exists():
        print(f"loraplex validate: {path} does not exist", file=sys.stderr)
        return 2
    runtime = Runtime(args.runtime) if args.runtime else None
    releases = RUNTIMES[runtime].releases if runtime else ()
    version = releases[-1].since if releases else None  # NIM: unknown, judged as its note says
    if args.runtime_version is not None:
        if runtime is None:
            print("loraplex validate: --runtime-version needs --runtime", file=sys.stderr)
            return 2
        version = parse_version(args.runtime_version)
        if version is None:
            print(f"loraplex validate: --runtime-version {args.runtime_version!r} is not a version such as 0.32.0 "
                  "(vLLM) or 2.0.5 (NIM)", file=sys.stderr)
            return 2
    note = version_note(runtime, version) if runtime else None
    if note and (args.runtime_version is not None or runtime == Runtime.NIM):
        print(f"loraplex validate: {note}", file=sys.stderr)
    if args.max_rank is not None and args.max_rank < 1:
        print(f"loraplex validate: --max-rank must be at least 1, not {args.max_rank}", file=sys.stderr)
        return 2
    base_config = _base_config("validate", args.base_config)
    policy = AdapterPolicy(
        runtime=runtime, runtime_version=version, max_rank=args.max_rank,
        expected_format=AdapterFormat(args.format), base_config=base_config,
    )
    with tempfile.TemporaryDirectory(prefix="loraplex-validate-") as scratch:
        directory = Path(scratch) / "adapter"
        if path.is_file():  # a lone .nemo file: look at it as the folder the runtime would get
            directory.mkdir()
            (directory / path.name).symlink_to(path.resolve())
        try:
            if path.is_dir() and runtime is not None and capabilities(runtime, version).conversion(
                    detect_format(path), nemo2.is_nemo2(path)) is not None:
                shutil.copytree(path, directory)  # judged as the sidecar would: converted, and never in place
            elif path.is_dir():
                directory = path
            report, converted_from = validate_or_convert(directory, policy)
        except Rejection as rejection:
            verdict = {"accepted": False, "format": None, "rank": None, "targetModules": [],
                       "reason": str(rejection), "convertedFrom": None}
        else:
            verdict = {"accepted": True, "format": report.format.value, "rank": report.rank,
                       "targetModules": list(report.target_modules), "reason": None,
                       "convertedFrom": converted_from.value if converted_from else None}
    if args.json:
        print(json.dumps(verdict))
    elif verdict["accepted"]:
        converted = f" (converted from {verdict['convertedFrom']})" if verdict["convertedFrom"] else ""
        print(f"accepted: {verdict['format']} adapter{converted}, rank {verdict['rank']}, "
              f"targets {', '.join(verdict['targetModules'])}")
    else:
        print(f"rejected: {verdict['reason']}")
    return 0 if verdict["accepted"] else 1


def _run_local_cluster(args: argparse.Namespace) -> int:
    import signal
    import tempfile

    from loraplex.local.binaries import BinariesNotFound, find_binaries
    from loraplex.local.controlplane import ControlPlane, ControlPlaneError
    from loraplex.local.kubelet import ProcessKubelet
    from loraplex.local.serviceproxy import ServiceProxy

    configure(args.log_level)
    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        print(f"loraplex local-cluster: {exc}", file=sys.stderr)
        return 2
    if args.binaries_only:
        print(binaries)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-cluster-"))
    plane = ControlPlane(workdir / "control-plane", binaries)
    kubelet = service_proxy = None
    try:
        plane.start()
        if args.gpus is not None:
            kubelet = ProcessKubelet(plane.kubeconfig, workdir / "kubelet", node_name=args.node_name,
                                     gpus=args.gpus).start()
            # Logs the host port of each Service it routes to the kubelet's pods.
            service_proxy = ServiceProxy(plane.kubeconfig, [kubelet]).start()
        print(f"Kubernetes control plane ready at {plane.url}\nexport KUBECONFIG={plane.kubeconfig}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except (ControlPlaneError, PermissionError) as exc:
        print(f"loraplex local-cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        if service_proxy is not None:
            service_proxy.stop()
        if kubelet is not None:
            kubelet.stop()
        plane.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser("operator", help="run the Kubernetes operator")
    operator.add_argument("--namespace", "-n", action="append", help="namespace to watch (repeatable)")
    operator.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    peering = operator.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", default=None,
                         help="run without peering (one operator replica only)")
    peering.add_argument("--peering", default=None, help="kopf peering name for leader election")
    operator.add_argument("--priority", type=int, default=None,
                          help="peering priority (the highest live replica acts); random by default")
    operator.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    operator.set_defaults(func=_run_operator)

    sidecar = commands.add_parser("sidecar", help="run the adapter sidecar (in an inference pod; configured by "
                                  "the environment the operator renders)")
    sidecar.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                         help="overrides the level the operator renders into the pod")
    sidecar.set_defaults(func=_run_sidecar)

    local = commands.add_parser("local-cluster", help="run a real Kubernetes control plane on this machine, with "
                                "a process kubelet for one GPU node, until interrupted (for development)")
    local.add_argument("--workdir", type=Path, default=None, help="where state, logs and the kubeconfig go")
    local.add_argument("--gpus", type=int, default=8,
                       help="nvidia.com/gpu the node offers; the kubelet needs root (default 8)")
    local.add_argument("--no-kubelet", dest="gpus", action="store_const", const=None,
                       help="only the control plane: pods stay Pending")
    local.add_argument("--node-name", default="local-gpu-node")
    local.add_argument("--binaries-only", action="store_true",
                       help="only find, unpack or download the binaries and print their folder")
    local.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    local.set_defaults(func=_run_local_cluster)

    crds = commands.add_parser("crds", help="write the CRD manifests generated from the API types")
    crds.add_argument("directory", type=Path, help="where to write them (crds/)")
    crds.add_argument("--check", action="store_true", help="fail if the files there are stale")
    crds.set_defaults(func=_run_crds)

    validate = commands.add_parser("validate", help="check an adapter the way the sidecar will (exit 0 accepted, "
                                   "1 rejected, 2 usage error)")
    validate.add_argument("path", type=Path, help="adapter folder (or a .nemo file)")
    validate.add_argument("--runtime", choices=[runtime.value for runtime in Runtime],
                          help="check what this runtime can load")
    validate.add_argument("--runtime-version", metavar="VERSION",
                          help="the runtime version to check for, e.g. vLLM 0.11.0 or NIM 2.0.5 (default: the newest "
                          "vLLM loraplex knows; NIM 1.x)")
    validate.add_argument("--max-rank", type=int, help="largest rank the base model accepts")
    validate.add_argument("--format", default=AdapterFormat.AUTO.value, choices=[fmt.value for fmt in AdapterFormat],
                          help="format the adapter must be")
    validate.add_argument("--base-config", type=Path, help="the base model's config.json, to check tensor shapes")
    validate.add_argument("--json", action="store_true", help="print one JSON object")
    validate.set_defaults(func=_run_validate)

    from loraplex.formats.convert import SOURCE_LAYOUTS

    convert = commands.add_parser(
        "convert", help="write another producer's adapter as a Hugging Face PEFT adapter (exit 0 written, "
        "1 the adapter cannot be converted, 2 usage error)",
        description="Write a LoRA adapter saved by another producer as a Hugging Face PEFT adapter, with the same "
        "ΔW = B·A·scale for every module and layer.", epilog=SOURCE_LAYOUTS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", type=Path, help="the adapter folder to convert")
    convert.add_argument("out", type=Path, help="a new or empty folder for the PEFT adapter")
    convert.add_argument("--base-config", type=Path,
                         help="the base model's config.json (needed for TensorRT-LLM, NeMo and NxD)")
    convert.set_defaults(func=_run_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
