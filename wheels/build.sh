#!/usr/bin/env bash
# Builds a sloth wheel for the local toolchain into wheelhouse/, versioned for its runtime:
#   0.1.0+cu130 (CUDA 13.0 torch), 0.1.0+rocm71 (ROCm 7.1 torch), 0.1.0+cpu.
# The wheel is abi3 (one per runtime serves CPython >= 3.10) and carries the CUDA / HIP architectures
# in sloth/_build_config.py (shown by `sloth info`) and in its METADATA (Keywords: archs=...).
#   SLOTH_CUDA_ARCHS="80;90a" (default)  SLOTH_HIP_ARCHS="gfx90a;gfx942"  SLOTH_BACKENDS=cpu
# Usage: bash wheels/build.sh   (run from any directory; needs torch, scikit-build-core, cmake, ninja)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
read -r runtime archs < <("$PY" - <<'PYEOF'
import os, torch
if os.environ.get("SLOTH_BACKENDS") == "cpu":
    print("cpu -")
elif torch.version.cuda:
    print("cu" + torch.version.cuda.replace(".", ""), os.environ.get("SLOTH_CUDA_ARCHS", "80;90a"))
elif torch.version.hip:
    print("rocm" + "".join(torch.version.hip.split(".")[:2]), os.environ.get("SLOTH_HIP_ARCHS", "gfx90a;gfx942"))
else:
    print("cpu -")
PYEOF
)
base=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
version="$base+$runtime"
echo "building sloth $version (architectures: $archs)"
mkdir -p wheelhouse
"$PY" - "$version" "$archs" <<'PYEOF'
# Build, then rewrite the version (local suffix), pin torch to the minor release the extension was compiled
# against (its C++ ABI changes between minors; `import sloth` checks it too) and add the architectures.
import base64, csv, hashlib, io, pathlib, re, subprocess, sys, zipfile
import torch
version, archs = sys.argv[1], sys.argv[2]
torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
subprocess.check_call([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                       "wheelhouse", "."])
src = max(pathlib.Path("wheelhouse").glob("sloth_kernels-*.whl"), key=lambda p: p.stat().st_mtime)
base = src.name.split("-")[1]
dst = src.with_name(src.name.replace(f"sloth_kernels-{base}-", f"sloth_kernels-{version}-"))
old_info, new_info = f"sloth_kernels-{base}.dist-info", f"sloth_kernels-{version}.dist-info"
files = {}
with zipfile.ZipFile(src) as z:
    for n in z.namelist():
        data = z.read(n)
        n2 = n.replace(old_info, new_info)
        if n2.endswith("METADATA"):
            text = data.decode().replace(f"Version: {base}", f"Version: {version}", 1)
            text = text.replace("\n\n", f"\nKeywords: archs={archs.replace(';', ',')}\n\n", 1)
            text = re.sub(r"^Requires-Dist: torch\b[^;\n]*", f"Requires-Dist: torch=={torch_minor}.*", text, count=1,
                          flags=re.M)
            data = text.encode()
        files[n2] = data
record = f"{new_info}/RECORD"
out = io.StringIO()
w = csv.writer(out)
for n, data in files.items():
    if n == record:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    w.writerow([n, f"sha256={digest}", len(data)])
w.writerow([record, "", ""])
files[record] = out.getvalue().encode()
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
    for n, data in files.items():
        z.writestr(n, data)
if dst != src:
    src.unlink()
print(f"wrote {dst}")
PYEOF
ls -la wheelhouse
