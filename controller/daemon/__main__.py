"""``python -m controller.daemon …`` runs ``finops run …`` (until the CLI registers it)."""

from controller.daemon.command import run

if __name__ == "__main__":
    run(prog_name="finops run")
