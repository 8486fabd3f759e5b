"""Several processes under torchrun (gloo on 127.0.0.1): they give what one process gives."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, mobilenet_weights

from images import features_path

pytestmark = pytest.mark.slow


def torchrun(processes, *command):
    """Run a command file under torchrun on this machine; its output if it fails."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run([*launch, *command], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_extract_the_same_features_as_one(demo, tmp_path):
    arrays = {}
    for processes in (1, 2):
        caption_path = str(tmp_path / f"{processes}" / "caption.pth")
        os.makedirs(os.path.dirname(caption_path))
        shutil.copy(demo.caption_data_path, caption_path)
        torchrun(processes, "feature_extract.py", "extract", f"--caption-data-path={caption_path}",
                 f"--img-path={demo.img_path}", "--backbone=mobilenet_v2", f"--weights={mobilenet_weights()}",
                 "--grid=7", "--batch-size=16", "--num-workers=0")
        arrays[processes] = [np.load(features_path(caption_path, grid)) for grid in (False, True)]
        assert sorted(os.listdir(os.path.dirname(caption_path))) == [
            "caption.features.bad.tsv", "caption.features.json", "caption.features.npy", "caption.pth",
            "caption.regions.npy"]  # no partial files left
    for one, two in zip(arrays[1], arrays[2]):
        assert one.shape[0] == 120 and np.abs(one).sum() > 0
        np.testing.assert_array_equal(two, one)
