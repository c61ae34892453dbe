"""tunelab: from a dataset to a fine-tuned model, validated metrics and predictions, with one YAML and one command."""

from tunelab import _compat

__version__ = "0.1.0"

_compat.install()  # before anything imports torchvision (transformers and timm do): see _compat
