"""`python -m dslaunch` runs the command line."""

from dslaunch.cli import main

main()
