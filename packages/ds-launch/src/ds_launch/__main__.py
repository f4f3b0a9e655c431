"""``python -m ds_launch`` is ``ds-launch``."""

from ds_launch.cli import console_main

if __name__ == "__main__":
    console_main()
