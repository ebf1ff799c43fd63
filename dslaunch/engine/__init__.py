"""Model loading and batched inference on every rank (transformers + DeepSpeed AutoTP)."""
