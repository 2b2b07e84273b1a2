"""pytest set-up shared by every test: environment variables that must exist before the first import that reads them.

TRITON_INTERPRET=1 without a CUDA device: Triton reads it when a kernel is *defined* (at import of kernels/*),
so it must be set here, before any test module imports a kernel. MUJOCO_GL=egl: read once at `import mujoco`.
"""

import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# subprocess runs of the entry scripts run as a CPU user runs them: PyTorch references for the kernels (the kernels
# themselves are tested in-process in the Triton interpreter, which is 100x slower and would dominate every
# world-model run there)
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
