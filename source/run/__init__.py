"""Run machinery: distributed set-up, run directories, checkpoints, metrics, command-line parsing."""
