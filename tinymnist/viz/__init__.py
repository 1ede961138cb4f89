"""Pictures of a run: curves, digits with predictions, a confusion matrix, TensorBoard, export.

Nothing here is needed to train; read it after the algorithm. Terminal drawing uses
rich only; PNGs, reading your own images, TensorBoard and safetensors need the
optional extra, `pip install 'tinymnist[viz]'` (tool/extras.py).

    commands.py         plot, predict, export: the CLI side, register(app)
    runs.py             --metrics files -> curves per run (mean and band for many models)
    textplot.py         curves in braille in the terminal, or as a plain table
    curves.py           curves as a PNG (matplotlib)
    predict.py          probabilities for test digits or your images; which to show
    preprocess.py       your photo -> a 28x28 digit made the way MNIST's were
    digits.py           digits in the terminal (half blocks), as ASCII, or as a PNG grid
    confusion.py        the 10x10 confusion matrix: table, PNG, JSON
    export.py           a plain state_dict for the tutorials' own nn.Modules

train --tensorboard's reporter is the tool's (tool/tensorboard.py), like the other reports.
"""
