"""The built-in format families, one module each: safetensors, torch pickles, DCP folders,
DeepSpeed ZeRO folders and GGUF files. Each holds one
:class:`~ckptsurgeon.formats.family.Format` subclass; the registry lists them by name."""
