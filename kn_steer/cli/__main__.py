"""``python -m kn_steer.cli``."""

from kn_steer.cli import main

main()
