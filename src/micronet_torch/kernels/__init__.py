"""Every native kernel of Dynamic Shift-Max: the C/C++ sources (``csrc/``), their build and trusted cache, and one
small registration module per consumer.

Names: "fused" is the training kernels, "ops" the runtime operators (what ``micronet export --fused-ops``
writes into a file and each runtime must load).

- ``cache``: the library cache, trusted through file descriptors (checked folder walk, ``fstat``, SHA-256 of
  the open file, loading through ``/proc/self/fd/N``), and its build lock.
- ``build``: compiling a single source file into that cache (``open_library``).
- ``fused``: the training kernels as ``torch.library`` ops with autograd (C on the CPU through ctypes);
  ``fused_triton``: their Triton kernels for CUDA tensors.
- ``op``: ``micronet::shift_max``, the PyTorch operator every runtime operator implements;
  ``onnx_translation``: how the dynamo ONNX exporter writes it (``micronet.ShiftMax``).
- ``ort_ops``, ``openvino_ops``, ``executorch_ops``: the ONNX Runtime operator library, the OpenVINO extension
  and the ExecuTorch kernel, each built and registered with its runtime.

``ops.shift_max`` is the public Dynamic Shift-Max; this package sits below it and imports nothing of it.
"""
