"""Post-training pruning (magnitude, Wanda, SparseGPT), unstructured or N:M, optionally with quantization."""
