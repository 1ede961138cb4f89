"""tinymnist: MNIST trained with raw tensors, torch.func and torch.compile.

No torchvision, no DataLoader, no nn.Module holding state. Read the files in this
order: idx.py, fetch.py, data.py, shapes.py, models.py, optim.py, config.py,
train.py, checkpoint.py, report.py, cli.py, bench.py.
"""

__version__ = "0.1.0"
