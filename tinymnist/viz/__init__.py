"""Pictures of a run: curves, digits with predictions, a confusion matrix, export.

Nothing here is needed to train; read it after the algorithm. commands.py is the CLI side
(plot, predict, export); each other module's docstring says what it draws. Terminal
drawing uses rich only; PNGs, reading your own images and safetensors need the optional
extra, `pip install 'tinymnist[viz]'` (tool/extras.py). train --tensorboard's reporter is
the tool's (tool/tensorboard.py), like the other reports.
"""
