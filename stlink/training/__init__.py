"""Training and evaluation: masked metrics, naive baselines, the train and evaluate steps,
checkpoints (``load_trained``) and plots."""
