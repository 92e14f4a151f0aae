"""Fleet manifests: YAML in git → validated, resolved :class:`policies.spec.DesiredState`."""

from controller.manifest.loader import load_manifests

__all__ = ["load_manifests"]
