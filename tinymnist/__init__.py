"""tinymnist: MNIST trained with raw tensors, torch.func and torch.compile.

No torchvision, no DataLoader, no nn.Module holding state. The folders are the layers:
algorithm/ is the whole algorithm (train.py: the step, the data order, evaluation and
the loop; networks.py, optim.py, schedules.py, shapes.py, config.py: the recipes);
transforms/ makes the step fast or wide (compile, micro-batches, CUDA graphs, vmap over
N models, the all-reduce across processes); data/ gets MNIST's files; tool/ is the
command around the loop (cli.py, run.py, checkpoints, reports, bench); viz/ draws the
pictures. Read algorithm/train.py first, then networks.py and optim.py, then transforms/.

The library in a dozen lines:

    import tinymnist as tm
    tm.flush_denormals()                                  # first: before torch starts its threads
    tm.reuse_freed_memory()                               # each step's tensors on the last step's pages
    data = tm.load_mnist("data", "cpu")                   # tinymnist download fetches the files
    config = tm.recipe_config("mlp", epochs=2)            # the tutorial's recipe, overridden
    optimizer = tm.optim.adam()
    state = tm.initial_state(config, optimizer, "cpu")
    step = tm.compiled(tm.make_step(tm.make_gradient(config), optimizer))
    training = tm.Training(config, [config], step, tm.TestSet(config, [config], data))
    result = tm.fit(training, data, state)
    print(result.records[-1]["test_accuracy"])

Names are imported on first use, so `import tinymnist` stays light until one is used.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_mnist": "tinymnist.data",
    "recipe_config": "tinymnist.algorithm.config",
    "TrainConfig": "tinymnist.algorithm.config",
    "RECIPES": "tinymnist.algorithm.config",
    "init_params": "tinymnist.algorithm.networks",
    "apply": "tinymnist.algorithm.networks",
    "make_gradient": "tinymnist.algorithm.train",
    "make_step": "tinymnist.algorithm.train",
    "initial_state": "tinymnist.algorithm.train",
    "fit": "tinymnist.algorithm.train",
    "Training": "tinymnist.algorithm.train",
    "TestSet": "tinymnist.algorithm.train",
    "evaluate": "tinymnist.algorithm.train",
    "compiled": "tinymnist.transforms.speed",
    "micro_batched": "tinymnist.transforms.speed",
    "device_step": "tinymnist.transforms.speed",
    "AdaptiveThreads": "tinymnist.transforms.cpu_threads",
    "flush_denormals": "tinymnist.transforms.denormals",
    "reuse_freed_memory": "tinymnist.transforms.freed_memory",
    "optim": "tinymnist.algorithm.optim",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tinymnist' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    return module if module.__name__.endswith(f".{name}") else getattr(module, name)
