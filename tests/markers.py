"""Skip markers shared by the test modules."""

import pytest

from tinymnist.devices import cpu_compiler

# torch.compile on the CPU builds C++; without a compiler tinymnist trains eager (tested in
# test_cli.py) and the tests of the compiled step have nothing to run.
needs_cpp_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler")
