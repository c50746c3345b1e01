"""TopK sparse autoencoder: model, training, file formats and metrics (issue #4)."""

from autointerp.sae.io import load_sae, save_sae
from autointerp.sae.metrics import MetricsConfig, measure_sae, reconstruction_metrics
from autointerp.sae.model import SAEConfig, TopKSAE
from autointerp.sae.train import TrainConfig, train_sae

__all__ = ["SAEConfig", "TopKSAE", "TrainConfig", "load_sae", "save_sae", "train_sae",
           "MetricsConfig", "measure_sae", "reconstruction_metrics"]
