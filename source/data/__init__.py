"""Data: augmentations (``transforms``), datasets in their torchvision layouts (``datasets``),
train/val/test splits and subsampling (``splits``), and the offline FashionMNIST set-up
(``python -m source.data.fashion_mnist_setup``)."""
from source.data.datasets import (
    DOWNSTREAM_DATASETS,
    MULTILABEL_DATASETS,
    PRETEXT_DATASETS,
    DatasetNotFoundError,
    DownstreamSplits,
    build_downstream_splits,
    build_pretext_dataset,
)
from source.data.splits import SplitSubset, dataset_labels, subsample
from source.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewTransform,
    downstream_test_transform,
    downstream_train_transform,
    pretext_transform,
)

__all__ = [
    "DOWNSTREAM_DATASETS", "MULTILABEL_DATASETS", "PRETEXT_DATASETS", "DatasetNotFoundError", "DownstreamSplits",
    "build_downstream_splits", "build_pretext_dataset", "SplitSubset", "dataset_labels", "subsample",
    "IMAGENET_MEAN", "IMAGENET_STD", "TwoViewTransform", "downstream_test_transform", "downstream_train_transform",
    "pretext_transform",
]
