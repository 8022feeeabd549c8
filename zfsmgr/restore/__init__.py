"""Restore: list, restore chains, save, mount, verify."""
