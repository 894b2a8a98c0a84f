"""Point the ROS 2 wheels' exported CMake files at this environment's Python and NumPy.

The ros-jazzy-* wheels were built on a manylinux machine, and their exported CMake targets
name that machine's include directories (/opt/python/cp3XX-cp3XX/...). CMake refuses
imported targets whose include directories do not exist, so scripts/setup rewrites them to
the running interpreter's include directory and NumPy's. Idempotent: a second run changes
nothing and says so.
"""

import pathlib
import re
import sys
import sysconfig

import numpy

FOREIGN_NUMPY = re.compile(
    r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include")
FOREIGN_PYTHON = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")


def main() -> int:
    prefix = pathlib.Path(sys.prefix)
    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = 0
    for cmake_file in sorted((prefix / "share").glob("*/cmake/*.cmake")):
        text = cmake_file.read_text()
        if "/opt/python/" not in text:
            continue
        fixed = FOREIGN_PYTHON.sub(python_include, FOREIGN_NUMPY.sub(numpy_include, text))
        if "/opt/python/" in fixed:
            print(f"error: unknown foreign path left in {cmake_file}", file=sys.stderr)
            return 1
        cmake_file.write_text(fixed)
        changed += 1
    print(f"  wheel CMake exports: {changed} file(s) rewritten to {python_include}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
