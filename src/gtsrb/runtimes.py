"""The CPU runtimes the pipeline measures, one test stage each (test-<name>), and their names.

No torch here: the command line and the torch-free server read these.
"""

BACKENDS = ("openblas", "acl")  # PyTorch with oneDNN off (BLAS and native kernels), and on
RUNTIMES = (*BACKENDS, "onnxruntime")  # the baseline first
LABELS = {"openblas": "OpenBLAS", "acl": "oneDNN + ACL", "onnxruntime": "ONNX Runtime"}
