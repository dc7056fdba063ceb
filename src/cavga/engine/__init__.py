"""Training, inference and calibration, checkpoints, data-parallel runs and the run log of one model."""
