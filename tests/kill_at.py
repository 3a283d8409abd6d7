"""Run `hsc ARGS...` and stop it at a chosen point of a compile, for tests that kill it there.

    python3 -m tests.kill_at POINT MARK ARGS...

At POINT the process creates the file MARK and sleeps, so a test can wait for MARK and send a
signal at exactly that point. The patches live here, in the test process's child, never in hsc.
Points:
  mid-shard       the first tensor of the first shard is being written (temporary directory half full)
  before-commit   every file of the artifact is written, the rename has not happened
  mid-exchange    --force: the new artifact has been swapped in, the old one not yet deleted
  mid-aside       --force where the swap is unsupported: the old artifact renamed aside, the new not in
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _stop(mark: str) -> None:
    Path(mark).touch()
    time.sleep(120)


def _patch(point: str, mark: str) -> None:
    from toolchain import compile as compile_mod
    from toolchain import outdir
    from toolchain.safetensors_writer import StreamingSafetensorsWriter

    if point == "mid-shard":
        write = StreamingSafetensorsWriter.write

        def stopping_write(self, name, tensor):
            write(self, name, tensor)
            _stop(mark)

        StreamingSafetensorsWriter.write = stopping_write
    elif point == "before-commit":
        commit = compile_mod.commit

        def stopping_commit(tmp, out_dir):
            _stop(mark)
            commit(tmp, out_dir)

        compile_mod.commit = stopping_commit
    elif point == "mid-exchange":
        exchange = outdir._exchange

        def stopping_exchange(a, b):
            done = exchange(a, b)
            assert done, "renameat2 RENAME_EXCHANGE is not supported here"
            _stop(mark)
            return done

        outdir._exchange = stopping_exchange
    elif point == "mid-aside":
        outdir._exchange = lambda a, b: False
        rename = os.rename

        def stopping_rename(src, dst):
            rename(src, dst)
            if ".old-" in Path(dst).name:
                _stop(mark)

        outdir.os = type(sys)("os_with_stopping_rename")
        outdir.os.__dict__.update(os.__dict__)
        outdir.os.rename = stopping_rename
    else:
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    point, mark, *args = sys.argv[1:]
    _patch(point, mark)
    from toolchain.cli import main

    sys.argv = ["hsc", *args]
    main()
