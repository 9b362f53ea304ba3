"""Check an sdist holds exactly the project's sources: every file git tracks (less CI config)
and nothing generated (no Cython .c, no compiled module).  Exit 1 with the difference if not.

    python tools/check_sdist.py dist/cylsm-X.tar.gz      (run from the git checkout)
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from fnmatch import fnmatch

NOT_SHIPPED = [".ci/*", ".github/*", ".gitignore", ".gitattributes"]
METADATA = ["PKG-INFO", "setup.cfg", "*.egg-info/*"]          # written by the sdist build
GENERATED = ["*.c", "*.so", "*.pyd", "*.dylib", "*.o", "*.html", "*.pyc"]
MUST_HAVE = ["src/*.pyx", "src/*.pxi", "src/*.h", "cylsm/*.pyi", "cylsm/py.typed",
             "tests/test_*.py", "tests/conftest.py", "README.md", "LICENSE", "pyproject.toml",
             "setup.py"]


def main(path: str) -> int:
    with tarfile.open(path) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers()
                 if m.isfile() and "/" in m.name]
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    if not tracked:
        print("check_sdist: `git ls-files` listed nothing: run from the git checkout",
              file=sys.stderr)
        return 1
    expected = {f for f in tracked if not any(fnmatch(f, p) for p in NOT_SHIPPED)}
    shipped = set(names)
    problems = []
    missing = sorted(expected - shipped)
    if missing:
        problems.append(f"missing from the sdist (add them to MANIFEST.in): {missing}")
    generated = sorted(n for n in shipped if any(fnmatch(n, p) for p in GENERATED))
    if generated:
        problems.append(f"generated files in the sdist: {generated}")
    extra = sorted(n for n in shipped - expected
                   if not any(fnmatch(n, p) for p in METADATA + GENERATED))
    if extra:
        problems.append(f"files in the sdist that git does not track: {extra}")
    for pattern in MUST_HAVE:
        if not any(fnmatch(n, pattern) for n in shipped):
            problems.append(f"the sdist has no {pattern}")
    if problems:
        print("check_sdist: FAILED for " + path, *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"check_sdist: OK, {len(shipped)} files: every tracked source, nothing generated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
