"""Traffic-sign recognition on GTSRB: data, training, evaluation and serving."""

__version__ = "0.1.0"
