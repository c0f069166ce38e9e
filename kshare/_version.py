"""The package version, in one place (imported by modules that record it in files)."""

__version__ = "0.1.0"
