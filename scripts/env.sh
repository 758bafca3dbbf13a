# Sourced by the other scripts: where the Python venv (torch==2.11.0, the libtorch we link) and
# the cargo target dir live. Both sit outside the clone so fresh clones on the same machine (CI)
# reuse them; both are rebuilt from nothing when absent.
MEZO_CACHE="${MEZO_CACHE:-$HOME/.cache/mezo}"
MEZO_VENV="${MEZO_VENV:-$MEZO_CACHE/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MEZO_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$MEZO_VENV/bin:$PATH"
# libtorch's shared libraries, for the test binaries (the `mezo` binary also records them as rpath).
if [ -x "$MEZO_VENV/bin/python" ]; then
  _torch_lib=$(ls -d "$MEZO_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)
  [ -n "$_torch_lib" ] && export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
