"""ONNX / TensorRT export (installed as genrec_jax.export).

    python -m genrec_jax.export --checkpoint RUN_DIR --out DIR     export + lint + parity + Triton
    python -m genrec_jax.export.trt_lint DIR                        TensorRT lint of *.onnx
    python -m genrec_jax.export.build_engine --export-dir DIR ...   TensorRT engines (needs tensorrt)
    python -m genrec_jax.export.triton_repo DIR                     Triton model repository

Modules: ``graphs`` (the JAX functions each graph is traced from), ``onnx_export``
(jax2onnx conversion, side files, manifest), ``plugins`` (jax2onnx adjustments),
``manifest``, ``parity`` (ONNX Runtime vs JAX), ``ort_client`` (the reference client:
retrieval, ranking, beam search over decode_step), ``trt_ops`` / ``trt_lint``,
``build_engine``, ``triton_repo``, ``serving_readme``.
"""
