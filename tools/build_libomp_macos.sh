#!/usr/bin/env bash
# Build LLVM's OpenMP runtime (libomp) for the macOS wheel: cibuildwheel's before-all on macOS.
#
# Why from source: Homebrew's libomp bottle is built for the runner's macOS, and delocate
# rejects a library whose minimum macOS is newer than the wheel's MACOSX_DEPLOYMENT_TARGET.
# Built here with -mmacosx-version-min=$MACOSX_DEPLOYMENT_TARGET for exactly one architecture,
# it is linked by setup.py (CYLSM_OPENMP_PREFIX) and vendored into the wheel by delocate.
#
# Environment (set per architecture in pyproject.toml [tool.cibuildwheel] overrides):
#   CYLSM_OPENMP_PREFIX      install prefix (gets include/omp.h and lib/libomp.dylib)
#   CYLSM_LIBOMP_ARCH        x86_64 or arm64
#   MACOSX_DEPLOYMENT_TARGET the wheel's minimum macOS
#   LLVM_VERSION             optional, default below (pinned: the same runtime in every wheel)
set -euo pipefail

LLVM_VERSION=${LLVM_VERSION:-19.1.7}
: "${CYLSM_OPENMP_PREFIX:?set CYLSM_OPENMP_PREFIX (where libomp is installed)}"
: "${CYLSM_LIBOMP_ARCH:?set CYLSM_LIBOMP_ARCH (x86_64 or arm64)}"
: "${MACOSX_DEPLOYMENT_TARGET:?set MACOSX_DEPLOYMENT_TARGET (the wheel's minimum macOS)}"

if [ -f "$CYLSM_OPENMP_PREFIX/lib/libomp.dylib" ]; then
    echo "libomp already built in $CYLSM_OPENMP_PREFIX"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base="https://github.com/llvm/llvm-project/releases/download/llvmorg-$LLVM_VERSION"
cd "$work"
# The standalone openmp build needs LLVM's shared cmake modules beside it, as ../cmake.
for part in openmp cmake; do
    curl --fail --location --retry 5 --silent --show-error \
        -o "$part.tar.xz" "$base/$part-$LLVM_VERSION.src.tar.xz"
    shasum -a 256 "$part.tar.xz"        # recorded in the log
    tar -xf "$part.tar.xz"
    mv "$part-$LLVM_VERSION.src" "$part"
done

cmake -S openmp -B build \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$CYLSM_OPENMP_PREFIX" \
    -DCMAKE_OSX_ARCHITECTURES="$CYLSM_LIBOMP_ARCH" \
    -DCMAKE_OSX_DEPLOYMENT_TARGET="$MACOSX_DEPLOYMENT_TARGET" \
    -DCMAKE_INSTALL_NAME_DIR="$CYLSM_OPENMP_PREFIX/lib" \
    -DLIBOMP_INSTALL_ALIASES=OFF \
    -DLIBOMP_ENABLE_SHARED=ON \
    -DOPENMP_ENABLE_LIBOMPTARGET=OFF \
    -DOPENMP_ENABLE_OMPT_TOOLS=OFF \
    -DLIBOMP_OMPT_SUPPORT=OFF
cmake --build build --parallel "$(sysctl -n hw.ncpu)"
cmake --install build

lib="$CYLSM_OPENMP_PREFIX/lib/libomp.dylib"
test -f "$CYLSM_OPENMP_PREFIX/include/omp.h"
lipo -info "$lib"
# The minimum macOS recorded in the library must be the wheel's (delocate checks this).
otool -l "$lib" | grep -A4 -E "LC_BUILD_VERSION|LC_VERSION_MIN_MACOSX"
echo "libomp $LLVM_VERSION for $CYLSM_LIBOMP_ARCH, macOS >= $MACOSX_DEPLOYMENT_TARGET: $lib"
