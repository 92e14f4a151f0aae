"""The ``finops`` command line: the main group and the plan/apply commands (``app``), the
options, error handling and exit codes every command shares (``options``), the command groups
(``keys``, ``status``, ``approve``), and the renderers (``views``)."""

from controller.cli.app import main as main
