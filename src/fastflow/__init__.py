"""fastflow: unsupervised anomaly detection and localisation with 2D normalising flows (FastFlow).

    from fastflow import Predictor
    result = Predictor.from_run("runs/bottle").predict("part.png")
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "Prediction", "PredictionError", "FastFlow", "DatasetError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import fastflow` stays cheap (the CLI imports what each command needs).
    if name == "Predictor":
        from .predict import Predictor

        return Predictor
    if name == "Prediction":
        from .predict import Prediction

        return Prediction
    if name == "PredictionError":  # what Predictor.predict_iter yields for an item it cannot read
        from .predict import PredictionError

        return PredictionError
    if name == "DatasetError":  # raised for a missing, malformed or unreadable image or dataset
        from .data import DatasetError

        return DatasetError
    if name == "FastFlow":
        from .model import FastFlow

        return FastFlow
    raise AttributeError(f"module 'fastflow' has no attribute {name!r}")
