"""Model compression: quantization (RTN, AWQ, GPTQ, SmoothQuant, KV int8) and pruning (magnitude, Wanda, SparseGPT)."""
