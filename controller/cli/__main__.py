"""``python -m controller.cli``: the same entry point as the ``finops`` console script."""

from controller.cli.app import main

if __name__ == "__main__":
    main()
