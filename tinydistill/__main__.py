"""``python -m tinydistill`` is the console script (torchrun launches modules this way)."""

from .cli import main

if __name__ == "__main__":
    main()
