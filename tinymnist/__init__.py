"""tinymnist: MNIST trained with raw tensors, torch.func and torch.compile.

No torchvision, no DataLoader, no nn.Module holding state. The whole algorithm is
in train.py; read it first, then models.py and optim.py, then transforms.py (what
makes the step fast) and ensemble.py / distributed.py (what makes it wide). The rest
is the tool around it: config.py and run.py (what `train` does around the loop),
checkpoint.py, report.py, cli.py; and the data's I/O, which a learner can skip:
data.py, idx.py, fetch.py, sources.py, files.py. README.md has the full table.

The library in a dozen lines:

    import tinymnist as tm
    data = tm.load_mnist("data", "cpu")                   # tinymnist download fetches the files
    config = tm.recipe_config("mlp", epochs=2)            # the tutorial's recipe, overridden
    optimizer = tm.optim.adam()
    state = tm.initial_state(config, optimizer, "cpu")
    step = tm.compiled(tm.make_step(tm.make_gradient(config), optimizer))
    result = tm.fit(config, data, state, step)
    print(result.records[-1]["test_accuracy"])

Names are imported on first use, so `import tinymnist` stays light until one is used.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_mnist": "tinymnist.data",
    "recipe_config": "tinymnist.config",
    "TrainConfig": "tinymnist.config",
    "RECIPES": "tinymnist.config",
    "init_params": "tinymnist.models",
    "apply": "tinymnist.models",
    "make_gradient": "tinymnist.train",
    "make_step": "tinymnist.train",
    "initial_state": "tinymnist.train",
    "fit": "tinymnist.train",
    "evaluate": "tinymnist.train",
    "compiled": "tinymnist.transforms",
    "micro_batched": "tinymnist.transforms",
    "device_step": "tinymnist.transforms",
    "optim": "tinymnist.optim",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tinymnist' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    return module if module.__name__ == f"tinymnist.{name}" else getattr(module, name)
