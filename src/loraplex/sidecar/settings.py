"""Transitional: the sidecar's settings are in loraplex.api.contract. Only cli.py still imports them from here;
delete this module once it imports loraplex.api.contract instead."""

from loraplex.api.contract import SettingsError, SidecarSettings

__all__ = ["SettingsError", "SidecarSettings"]
