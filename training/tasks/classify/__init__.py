"""Classification: an image folder (a class per subfolder) → a head on pooled frozen features.

``config.py`` its options, ``data.py`` the folder scan and split, ``augment.py`` the augmentation presets,
``fit.py`` head training (cross-entropy, class weights, optional fine-tuning), ``metrics.py`` metrics and plots,
``export.py`` the export checks, ``task.py`` the task the engine runs.
"""
