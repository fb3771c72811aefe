"""Data layer: pooled data sets, partitioners that federate them, and loaders of naturally federated data."""
from .datasets import (
    CentralData,
    FederatedDataset,
    federate,
    from_arrays,
    from_client_arrays,
    from_torch_dataset,
    load_breast_cancer,
    load_digits,
    load_femnist_npz,
    make_synthetic,
)
from .heart_disease import load_heart_disease
from .leaf import LeafFormatError, load_leaf_json
from .shakespeare import load_shakespeare
from .partition import dirichlet, iid, label_table, quantity_skew, shards, summarize

__all__ = [
    "CentralData",
    "FederatedDataset",
    "LeafFormatError",
    "dirichlet",
    "federate",
    "from_arrays",
    "from_client_arrays",
    "from_torch_dataset",
    "iid",
    "label_table",
    "load_breast_cancer",
    "load_digits",
    "load_shakespeare",
    "load_femnist_npz",
    "load_heart_disease",
    "load_leaf_json",
    "make_synthetic",
    "quantity_skew",
    "shards",
    "summarize",
]
