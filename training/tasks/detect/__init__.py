"""Detection: a YOLO-format data set → a detection head on the frozen backbone (multi-scale pyramid, or one grid).

``config.py`` its options, ``data.py`` the data.yaml scan, ``augment.py`` box-aware augmentation and mosaic,
``fit.py`` head training, ``pyramid_loss.py`` and ``grid_loss.py`` the heads' targets and losses, ``metrics.py``
mAP and plots, ``export.py`` the export checks, ``crossval.py`` k-fold cross-validation, ``task.py`` the task the
engine runs.
"""
