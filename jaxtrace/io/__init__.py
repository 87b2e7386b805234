"""Files in and out: model loading, the compilation cache, checkpoints, result folders, circuits, export, plots."""
