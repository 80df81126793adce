"""The stages: pretext training, the BiSSL trainer, fine-tuning trials and HPO, train/eval loops."""
