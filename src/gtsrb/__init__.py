"""Traffic-sign recognition on GTSRB: data, training, evaluation and serving."""

__version__ = "0.1.0"

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # of every gtsrb command, and of serve's workers
