"""`hai launch`: every way a job starts ends in torchrun running `hai train` with the same overrides."""

from hai.launch.torchrun import local_command, run_local

__all__ = ["local_command", "run_local"]
