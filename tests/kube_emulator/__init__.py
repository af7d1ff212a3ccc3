"""A Kubernetes API emulator for loraplex's integration tests and demo; see README.md for its fidelity."""

from .server import EmulatorThread, make_app
from .store import ApiError, Store

__all__ = ["ApiError", "EmulatorThread", "Store", "make_app"]
