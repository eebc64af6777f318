"""Post-training quantization methods; each turns a model's dense linears into quantized ones."""
