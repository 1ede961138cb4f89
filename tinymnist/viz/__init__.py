"""Pictures of a run: curves, digits with predictions, a confusion matrix, export.

Nothing here is needed to train. commands.py is the CLI side (plot, predict, export).
Terminal drawing uses rich only; PNGs, reading your own images and safetensors need
`pip install 'tinymnist[viz]'` (tool/extras.py).
"""
