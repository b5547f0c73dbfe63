"""A non-editable install must carry the kernel templates inside the wheel."""

import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_wheel_ships_every_template(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    ROOT], check=True)
    (wheel,) = glob.glob(str(tmp_path / "llamagraph-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "templates", "*.j2"))}
    assert templates and {f"llamagraph/templates/{t}" for t in templates} <= names
    assert "llamagraph/cli.py" in names and any(n.endswith("entry_points.txt") for n in names)
