"""Integer execution of frozen quantized models."""
