"""`python -m tinymnist` is the same as the `tinymnist` console script."""

from tinymnist.entry import main

main()
