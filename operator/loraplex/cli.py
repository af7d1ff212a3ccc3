"""The `loraplex` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loraplex import __version__


def _run_operator(args: argparse.Namespace) -> int:
    import kopf

    import loraplex.operator.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per handled event is noise
    if args.all_namespaces and args.namespace:
        print("loraplex operator: use either --namespace or --all-namespaces, not both", file=sys.stderr)
        return 2
    if not args.all_namespaces and not args.namespace:
        print("loraplex operator: name the namespaces to watch (--namespace, repeatable) or --all-namespaces",
              file=sys.stderr)
        return 2
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
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
    operator.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    operator.set_defaults(func=_run_operator)

    crds = commands.add_parser("crds", help="write the CRD manifests generated from the API types")
    crds.add_argument("directory", type=Path, help="where to write them (crds/)")
    crds.add_argument("--check", action="store_true", help="fail if the files there are stale")
    crds.set_defaults(func=_run_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
