"""Training side of headstart: data checks, augmentation, feature cache, head training, evaluation, export, CLI."""
