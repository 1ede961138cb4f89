"""tinymnist: MNIST trained with raw tensors, torch.func and torch.compile.

No torchvision, no DataLoader, no nn.Module holding state. Read the files in
this order: data.py, shapes.py, models.py, optim.py, train.py, checkpoint.py, cli.py.
"""

__version__ = "0.1.0"
