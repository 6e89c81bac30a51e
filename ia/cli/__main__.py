import logging

from ia.cli import main

logging.basicConfig(level=logging.WARNING)
main()
