"""finops' exit codes: the one table every command (and the daemon) takes them from.

=====  =================================================================================
code   meaning
=====  =================================================================================
0      success; no changes (``plan``), converged, a graceful daemon stop
1      an error: bad input, a usage error (unknown flag, bad value, missing argument:
       click's own 2 is mapped to 1), a refused plan, any failed agent, a failed or
       partial ``run --once`` pass, another writer holds the state directory, an
       unexpected exception (``controller.cli.conventions.run_main``)
2      changes are pending (``plan --detailed-exitcode``) and nothing else, as Terraform does
130    interrupted (Ctrl-C)
=====  =================================================================================
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    CHANGES = 2
    INTERRUPTED = 130


EXIT_OK = ExitCode.OK
EXIT_ERROR = ExitCode.ERROR
EXIT_CHANGES = ExitCode.CHANGES
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

__all__ = ["EXIT_CHANGES", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "ExitCode"]
