"""Fine-tuning: `loraplex train CONFIG.yaml` runs a QLoRA job and registers the adapter."""
