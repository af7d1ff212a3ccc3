"""Run the emulator in the foreground: python -m tests.kube_emulator --port 8001 [--kubeconfig PATH]."""

import argparse
import time
from pathlib import Path

import yaml

from .server import EmulatorThread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig pointing at the emulator here")
    args = parser.parse_args()
    emulator = EmulatorThread(port=args.port).start()
    if args.kubeconfig:
        args.kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig()))
    print(f"Kubernetes API emulator listening on {emulator.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
