"""cigl.serve: the deployment side (numpy, onnxruntime, pillow, matplotlib; never torch).

`cigl.serve.audit` is the `confidence-audit` tool.
"""
