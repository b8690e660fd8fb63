"""ONNX / TensorRT export (installed as genrec_jax.export)."""
