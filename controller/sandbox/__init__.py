"""Embedded sandbox of the GreenHelix A2A Commerce Gateway (1.4.8), quirks included.

``SandboxServer`` runs it in-process for tests and benchmarks; ``serve`` runs it in the
foreground for ``finops sandbox``. See ``controller.sandbox.app`` for what it reproduces.
"""

from controller.sandbox.clock import MutableClock
from controller.sandbox.server import SandboxServer, provision_admin_key, serve
from controller.sandbox.store import SandboxStore

__all__ = ["MutableClock", "SandboxServer", "SandboxStore", "provision_admin_key", "serve"]
