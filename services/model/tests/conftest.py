import pathlib
import sys

# Test modules import their shared helpers (model_helpers) from this directory.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
