"""The end of a run: LoRA merge and its verification, packaging, synthesis, the MLflow registry."""
