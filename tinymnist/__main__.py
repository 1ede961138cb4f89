"""`python -m tinymnist` is the same as the `tinymnist` console script."""

from tinymnist.cli import main

main()
