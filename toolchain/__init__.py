"""hsc toolchain: ingest a checkpoint, plan it for a target, write an artifact."""

__version__ = "0.1.0"
