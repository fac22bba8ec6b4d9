"""fastflow: unsupervised anomaly detection and localisation with 2D normalising flows (FastFlow)."""

__version__ = "0.1.0"
