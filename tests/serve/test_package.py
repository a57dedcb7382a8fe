"""The serve package's layout: runtime.py is the one module that needs torch (a second runtime
can serve without it), and uvicorn's factory string still finds the workers' app."""

import subprocess
import sys

# The concern modules imported without the package's re-exports (which load the runtime) and
# with torch made unimportable: any import of it, direct or through gtsrb, fails.
WITHOUT_TORCH = """
import importlib, pathlib, sys, types
import gtsrb
package = types.ModuleType("gtsrb.serve")
package.__path__ = [str(pathlib.Path(gtsrb.__file__).parent / "serve")]
sys.modules["gtsrb.serve"], sys.modules["torch"] = package, None
for name in ("app", "uploads", "batching", "front", "png"):
    importlib.import_module("gtsrb.serve." + name)
"""


def test_only_the_runtime_module_imports_torch():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_worker_factory_string_names_the_workers_app():
    from uvicorn.importer import import_from_string

    from gtsrb.serve import workers

    assert import_from_string("gtsrb.serve:worker_app") is workers.worker_app
