"""`python -m tinymnist` is the same as the `tinymnist` console script."""

from tinymnist.tool.entry import main

main()
