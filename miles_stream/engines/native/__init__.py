"""The native engine: a Hugging Face causal LM served in-process with PyTorch (`engine.NativeEngine`)."""
