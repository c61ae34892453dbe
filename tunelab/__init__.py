"""tunelab: from a dataset to a fine-tuned model, validated metrics and predictions, with one YAML and one command."""

__version__ = "0.1.0"
