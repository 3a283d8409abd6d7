"""hsc runtime: load an artifact and score HellaSwag. Never imports `toolchain`."""
