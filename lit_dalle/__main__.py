"""``python -m lit_dalle``: see ``lit_dalle.cli``."""

from lit_dalle.cli import main

if __name__ == "__main__":
    main()
