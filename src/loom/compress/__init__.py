"""Model compression: quantization (RTN, AWQ, GPTQ, SmoothQuant, KV int8) and, later, pruning."""
